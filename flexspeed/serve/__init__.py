"""Text in, text out: tokenizers from the model folder, a continuous-batching engine, an OpenAI-compatible server.

``flexspeed serve`` and ``flexspeed generate --prompts`` are built from these pieces::

    from flexspeed.serve import Engine, EngineOptions, SamplingParams, load_text_model, load_tokenizer

    model = load_text_model("my-model")                 # init_inference, fused kernels where the family has them
    engine = Engine(model, load_tokenizer("my-model"), EngineOptions(max_num_seqs=16)).start()
    seq = engine.submit(engine.tokenizer.encode("Hello"), SamplingParams(max_tokens=20, temperature=0), print)

``flexspeed.serve.app.build_app(engine, name)`` is the ASGI application (needs the ``serve`` extra).
"""

from __future__ import annotations

from flexspeed.serve.engine import Completion, Engine, EngineOptions
from flexspeed.serve.errors import QueueFull, RequestError
from flexspeed.serve.model import TextModel, load_text_model
from flexspeed.serve.sampling import SamplingParams
from flexspeed.serve.sequence import Output, Sequence
from flexspeed.serve.tokenizer import TextTokenizer, load_tokenizer

__all__ = ["Engine", "EngineOptions", "Completion", "SamplingParams", "Output", "Sequence", "TextModel",
           "TextTokenizer", "load_text_model", "load_tokenizer", "RequestError", "QueueFull"]
