"""The model folder's own tokenizer, its chat template, and text streamed out token by token.

:func:`load_tokenizer` reads the folder's tokenizer files with ``transformers``' ``AutoTokenizer``
(local files only: nothing is downloaded); a chat template comes from the folder
(``tokenizer_config.json``'s ``chat_template`` or ``chat_template.jinja``) or from a file given
with ``--chat-template``. Chat prompts are rendered to text and tokenized without adding special
tokens again (the template writes them), as vLLM does.

:class:`TextStream` turns the growing list of a request's new tokens into text deltas: after each
token it decodes a window of the last few tokens (skipping special tokens; vLLM's incremental
detokenization, so the cost per token does not grow with the completion) and sends what is new,
holding back a trailing incomplete UTF-8 character (decoded as U+FFFD) and, while stop strings are
set, the last ``len(longest stop) - 1`` characters, which could be the start of one. A stop string
ends the text before it. The completion's text is exactly the concatenation of the deltas, so a
streamed response and a whole one agree; for byte-level BPE and SentencePiece tokenizers it is also
``decode(all new tokens)``.
"""

from __future__ import annotations

import os
from typing import Any

from flexspeed.config.errors import ConfigError
from flexspeed.serve.errors import RequestError

__all__ = ["TextTokenizer", "TextStream", "load_tokenizer", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")
"""Files one of which a folder with a tokenizer holds."""


class TextTokenizer:
    """Encode prompts, render chats, decode completions.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        source: the folder it came from (for messages).
        chat_template: overrides the tokenizer's own template.
    """

    def __init__(self, tokenizer: Any, source: str, chat_template: str | None = None) -> None:
        self.hf, self.source = tokenizer, source
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or None

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with the special tokens the tokenizer adds (a BOS, for instance)."""
        return list(self.hf(text).input_ids)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The chat as the template writes it, ending with the assistant's turn.

        Raises:
            RequestError: no chat template, or the template rejects the messages.
        """
        if not self.chat_template:
            raise RequestError(f"the tokenizer in {self.source} has no chat template; use /v1/completions with a "
                               "plain prompt, add 'chat_template' to its tokenizer_config.json, or start the server "
                               "with --chat-template FILE", param="messages")
        try:
            return self.hf.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                               add_generation_prompt=True)
        except Exception as exc:  # the template's own raise_exception(...), a missing key, ...
            raise RequestError(f"the chat template rejected the messages: {exc}", param="messages") from exc

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the rendered chat (no special tokens added: the template wrote them)."""
        return list(self.hf(self.render_chat(messages), add_special_tokens=False).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


def load_tokenizer(folder: str, chat_template: str | None = None) -> TextTokenizer:
    """The tokenizer of a model folder.

    Args:
        folder: a Hugging Face model (or tokenizer) folder.
        chat_template: a Jinja file whose template replaces the folder's.
    Raises:
        ConfigError: the folder does not exist, holds no tokenizer files, or they do not load
            (key ``tokenizer``); the template file cannot be read (key ``chat_template``).
    """
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder!r} is not a folder; pass the model folder (config.json, weights and tokenizer "
                          "files) or --tokenizer DIR", key="tokenizer")
    if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise ConfigError(f"{folder!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the model's "
                          "tokenizer files into it, or pass --tokenizer DIR", key="tokenizer")
    template = None
    if chat_template is not None:
        try:
            with open(chat_template, encoding="utf-8") as f:
                template = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read the chat template {chat_template!r}: {exc.strerror}; pass a Jinja "
                              "file", key="chat_template") from exc
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging

        logging.set_verbosity_error()
        hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except ImportError as exc:
        raise ConfigError("reading a tokenizer needs transformers: pip install 'flexspeed[serve]'",
                          key="tokenizer") from exc
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for broken files
        raise ConfigError(f"the tokenizer in {folder!r} does not load ({type(exc).__name__}: {exc}); check its "
                          "tokenizer files, or pass --tokenizer DIR", key="tokenizer") from exc
    return TextTokenizer(hf, folder, template)


class TextStream:
    """Text deltas of a growing completion (see the module docstring).

    Args:
        tokenizer: decodes the completion.
        stop: strings that end the text (excluded from it).
    """

    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._decoded = ""  # the completion decoded so far (complete characters)
        self._prefix = self._read = 0  # token offsets of the decoding window
        self._partial = 0  # characters of an open window (one ending in an incomplete character) already taken
        self.text = ""
        """Everything sent so far: the completion's text."""
        self.stopped = False
        """A stop string was found."""

    def push(self, ids: list[int], final: bool) -> str:
        """The new text after the completion became ``ids``; with ``final`` nothing is held back.

        After a stop string is found (:attr:`stopped`) the text ends and further pushes return "".
        """
        if self.stopped:
            return ""
        self._decode(ids, final)
        full = self._decoded
        if self.stop:
            at = self._find_stop(full)
            if at is not None:
                self.stopped, final, full = True, True, full[:at]
        if not final and self.stop:
            full = full[:max(0, len(full) - self._hold)]
        if len(full) <= len(self.text):
            return ""
        delta = full[len(self.text):]
        self.text += delta
        return delta

    def _decode(self, ids: list[int], final: bool) -> None:
        """Extend the decoded text by the new tokens, decoding only a window of the last few.

        The window starts at the tokens of the previous extension: decoding ``ids[prefix:]`` and
        ``ids[prefix:read]`` alike and keeping the difference gives what the new tokens add, even for
        decoders that treat the first token of a sequence differently (SentencePiece's leading space);
        a window never starts at tokens that decode to nothing alone (special tokens, a bare "▁").
        A trailing incomplete character (U+FFFD) waits for the next token; the window then stays open.
        """
        before = self.tokenizer.decode(ids[self._prefix:self._read])
        now = self.tokenizer.decode(ids[self._prefix:])
        stable = now if final else now.rstrip("\ufffd")
        self._decoded += stable[len(before) + self._partial:]
        if len(stable) == len(now):  # complete: the next window starts at these tokens, if they decode to text
            if self.tokenizer.decode(ids[self._read:]):  # (alone: a first "▁" or special token would lose its text)
                self._prefix = self._read
            self._read, self._partial = len(ids), 0
        else:
            self._partial = max(self._partial, len(stable) - len(before))

    def _find_stop(self, full: str) -> int | None:
        begin = len(self.text)  # text is sent only once no stop string can begin in it
        hits = [i for i in (full.find(s, begin) for s in self.stop) if i >= 0]
        return min(hits) if hits else None
