"""Run code written for DeepSpeed through flexspeed: Hugging Face Trainer, Accelerate, Lightning.

- :mod:`flexspeed.integrations.identity`: the opt-in, per-process DeepSpeed identity
  (``python -m flexspeed.as_deepspeed script.py`` / ``flexspeed launch --as-deepspeed``): ``import
  deepspeed`` resolves to flexspeed's compatibility layer and ``importlib.metadata`` reports a
  ``deepspeed`` distribution, so libraries that check for DeepSpeed accept it.
- :mod:`flexspeed.integrations.deepspeed`: that compatibility layer, DeepSpeed's package layout over
  flexspeed's modules (the names those libraries use are listed in docs/integrations.md).
- :mod:`flexspeed.integrations.lightning`: a Lightning strategy (Fabric and Trainer) on flexspeed.
"""
