"""What the bot may show of its configuration: URLs without credentials, model names without paths on the host.

`/info` answers anyone in a server and logs travel to log stores, so neither may carry what a URL's user:password or
query string holds (`OPENAI_BASE_URL=https://user:password@host/v1`, a proxy's `?key=...`), nor where on the host a
model lives. Everything that shows a URL or a model goes through these functions.
"""

from __future__ import annotations

import re

# scheme://, then an optional user:password@ (the authority runs to the first / ? or #, as RFC 3986 reads it; the
# last @ in it ends the credentials), then host and path, then an optional query and fragment.
_URL = re.compile(
    r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/?#\s'\"<>`]*@)?(?P<rest>[^?#\s'\"<>`]*)(?:[?#][^\s'\"<>`]*)?"
)


def public_urls(text: str) -> str:
    """`text` (a URL, or a log line that quotes URLs anywhere) with each URL's user:password, query and fragment
    removed: `http://u:p@host:8000/v1?key=k` shows as `http://host:8000/v1`. Other text is left as it is."""
    return _URL.sub(lambda match: match["scheme"] + match["rest"], text)


def model_name(model: str) -> str:
    """How a model is shown: a hub id (`meta-llama/Llama-3.2-1B-Instruct`) as it is, a path on a host (absolute, or
    from the home directory) as its last part: the directory or file name (`SmolLM2-135M-Instruct.Q4_1.gguf`)."""
    if model.startswith(("/", "~", "\\")) or re.match(r"[a-zA-Z]:[\\/]", model):
        parts = [part for part in re.split(r"[\\/]", model) if part]
        return parts[-1] if parts else model
    return model
