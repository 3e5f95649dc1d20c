"""Studies: the config, the plan of runs and jobs, their cost, and the scheduler that runs them."""
