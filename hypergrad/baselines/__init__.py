"""Attribution baselines: influence functions, TracIn, self-loss, random."""
