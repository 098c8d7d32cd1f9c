"""``deepspeed.checkpoint`` for flexspeed: checkpoint helpers DeepSpeed-integrating code imports (``utils``)."""
