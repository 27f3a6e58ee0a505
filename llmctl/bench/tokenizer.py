"""The tokenizer the serving benchmark counts prompt tokens with: a local tokenizer
directory (`--tokenizer DIR`, through the `tokenizers` library) or the server's own
`/tokenize` and `/detokenize` (vLLM's routes), so no model files are needed on the client."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import httpx

from llmctl.errors import ConfigError, LlmctlError


class BenchTokenizer(Protocol):
    parallel: bool  # True: calls may run from several threads at once

    def encode(self, text: str) -> list[int]:
        """Token ids as the server counts a completion prompt (with its special tokens)."""

    def decode(self, ids: list[int]) -> str: ...


class LocalTokenizer:
    parallel = False

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise ConfigError(f"--tokenizer: no tokenizer.json in {path}",
                              hint="give a model dir with tokenizer.json, or leave it out to use the server's /tokenize")
        self._tok = Tokenizer.from_file(str(file))
        self.name = str(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


class ServerTokenizer:
    parallel = True

    def __init__(self, base_url: str, model: str, headers: dict[str, str]) -> None:
        self._client = httpx.Client(base_url=base_url, headers=headers, timeout=60.0)
        self._model = model
        self.name = f"{base_url}/tokenize"

    def _post(self, route: str, body: dict) -> dict:
        resp = self._client.post(route, json={"model": self._model, **body})
        if resp.status_code == 404 and '"param":"model"' not in resp.text.replace(" ", ""):
            raise LlmctlError(f"the server has no {route} to count prompt tokens with",
                              hint="pass --tokenizer DIR (the model's tokenizer files)")
        if resp.status_code != 200:
            raise LlmctlError(f"{route} answered {resp.status_code}: {resp.text[:200]}",
                              hint="pass --tokenizer DIR to count tokens on the client")
        return resp.json()

    def encode(self, text: str) -> list[int]:
        return self._post("/tokenize", {"prompt": text, "add_special_tokens": True})["tokens"]

    def decode(self, ids: list[int]) -> str:
        return self._post("/detokenize", {"tokens": ids})["prompt"]

    def close(self) -> None:
        self._client.close()
