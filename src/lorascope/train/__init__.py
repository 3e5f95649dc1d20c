"""Training: one loop for full fine-tuning and every LoRA variant, its plan, estimate and parts."""
