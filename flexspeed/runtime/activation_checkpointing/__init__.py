"""Activation checkpointing (DeepSpeed's ``deepspeed.runtime.activation_checkpointing`` path).

The module API lives in :mod:`.checkpointing`, which ``flexspeed.checkpointing`` names.
"""
