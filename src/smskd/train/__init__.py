"""Training: one step and epoch (epoch), one stage built (stage), the stage loop (stages),
and what lives beside the loop: resuming from checkpoints (resume), the frozen reference
(reference), acceleration, the output cache, progress reports (progress), stop signals
(interrupt) and DDP (distributed)."""
