"""lorascope: LoRA or full fine-tuning? Run the study of "LoRA Learns Less and Forgets Less" on your model."""

__version__ = "0.1.0"
