"""Training: one step and epoch (epoch), one stage built (stage), the stage loop
(stages), and what lives beside it: reference, acceleration, output cache, interrupts, DDP."""
