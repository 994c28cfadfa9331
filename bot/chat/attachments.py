"""Pure: which files of a message are read, and how they join the user turn.

A file is read when Discord says it is text (a `text/*` content type, or a JSON, XML, YAML, script type) or its name
has a common text extension (`.py`, `.md`, `.csv`, `Dockerfile`, ...), and Discord's reported size is within
ATTACHMENT_MAX_BYTES. Everything else is only named in the turn with why it was not read, so the model can say so
instead of pretending; such files are never fetched. The turn is the message's text, then each file that was read
(its name, then its text in a fenced block whose fence is longer than any backtick run inside, so the content
cannot end the block and `bot.chat.conversation` leaves its lines as written), then the lines naming the rest.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from dataclasses import dataclass

# What the turn says about a file that was not read. The model reads these; members see them in its answers.
IMAGE = "an image I can't see"
AUDIO = "an audio file I can't hear"
VIDEO = "a video I can't watch"
NOT_TEXT = "a file I can't read"
TOO_LARGE = "too large to read ({size}; I read text files up to {limit})"
NOT_DOWNLOADED = "could not be downloaded"
# How a file is introduced in the turn; not "name:" alone, which would read as a speaker's label and be quoted.
ATTACHED = "{name} (attached):"

# fmt: off
TEXT_EXTENSIONS = frozenset({
    "txt", "text", "md", "markdown", "rst", "adoc", "org", "tex", "bib", "log", "out", "csv", "tsv", "json", "jsonl",
    "ndjson", "geojson", "yaml", "yml", "toml", "ini", "cfg", "conf", "properties", "env", "xml", "html", "htm",
    "xhtml", "css", "scss", "sass", "less", "svelte", "vue", "py", "pyi", "ipynb", "js", "mjs", "cjs", "ts", "tsx",
    "jsx", "sh", "bash", "zsh", "fish", "ps1", "psm1", "bat", "cmd", "c", "h", "cpp", "hpp", "cc", "hh", "cxx", "cs",
    "java", "kt", "kts", "scala", "groovy", "gradle", "go", "rs", "rb", "php", "pl", "pm", "lua", "r", "swift",
    "dart", "m", "mm", "sql", "graphql", "gql", "proto", "diff", "patch", "srt", "vtt", "nix", "tf", "hcl", "zig",
    "ex", "exs", "erl", "hs", "ml", "clj", "lisp", "el", "vim", "asm", "s",
    # names without an extension, and dotfiles
    "gitignore", "gitattributes", "dockerignore", "editorconfig", "dockerfile", "makefile", "readme", "license",
    "changelog",
})
TEXT_CONTENT_TYPES = frozenset({
    "application/json", "application/x-ndjson", "application/xml", "application/yaml", "application/x-yaml",
    "application/toml", "application/javascript", "application/x-javascript", "application/ecmascript",
    "application/typescript", "application/sql", "application/x-sh", "application/x-shellscript",
    "application/x-httpd-php", "application/x-tex", "application/x-latex", "application/graphql",
    "application/x-subrip",
})
# Used only when Discord sends no content type, to say what kind of file it is.
MEDIA_EXTENSIONS = {
    IMAGE: frozenset({"png", "jpg", "jpeg", "gif", "webp", "bmp", "svg", "heic", "heif", "avif", "tif", "tiff", "ico"}),
    AUDIO: frozenset({"mp3", "wav", "ogg", "oga", "opus", "flac", "m4a", "aac", "wma"}),
    VIDEO: frozenset({"mp4", "m4v", "mov", "webm", "mkv", "avi", "wmv", "mpeg", "mpg"}),
}
# fmt: on
MEDIA_TYPES = {"image": IMAGE, "audio": AUDIO, "video": VIDEO}
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # Windows tools (PowerShell 5's `>`) write UTF-16 text


@dataclass(frozen=True, slots=True)
class Attached:
    """One file of a message as the turn shows it: its text when it was read, else why it was not."""

    name: str
    text: str | None = None
    why: str = ""


def extension(name: str) -> str:
    """The lower-case extension, or the whole name when it has none (`Dockerfile`, and `.gitignore`'s "gitignore")."""
    return name.lower().rsplit(".", 1)[-1]


def media_type(content_type: str | None) -> str:
    """The content type without its parameters ("text/plain; charset=utf-8" → "text/plain"), lower-case."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_text(name: str, content_type: str | None) -> bool:
    """Whether the file is worth reading as text. The extension counts even when the type says otherwise: a type
    guessed from the extension can be wrong (the usual tables make `.ts`, TypeScript to most, an MPEG video); what
    is not text after all is caught by `decode`."""
    kind = media_type(content_type)
    structured = kind.startswith("application/") and kind.endswith(("+json", "+xml"))
    return extension(name) in TEXT_EXTENSIONS or kind.startswith("text/") or kind in TEXT_CONTENT_TYPES or structured


def not_text(name: str, content_type: str | None) -> str:
    """What a file that is not text is, as the turn says it: an image, audio, a video, or some other file."""
    kind = media_type(content_type)
    if kind:
        return MEDIA_TYPES.get(kind.split("/", 1)[0], NOT_TEXT)
    return next((why for why, names in MEDIA_EXTENSIONS.items() if extension(name) in names), NOT_TEXT)


def file_size(size: int) -> str:
    """A size as Discord shows one: 900 bytes, 64 KB, 2.1 MB (units of 1,024)."""
    if size < 1024:
        return f"{size} bytes"
    amount = float(size)
    for unit in ("KB", "MB", "GB"):
        amount /= 1024
        if amount < 1024 or unit == "GB":
            break
    return f"{amount:.1f}".removesuffix(".0") + f" {unit}"


def skipped(name: str, content_type: str | None, size: int, max_bytes: int) -> Attached | None:
    """The file as the turn names it when it is not to be fetched (not text, or over `max_bytes` by Discord's
    count); None when it is to be fetched and read."""
    if not is_text(name, content_type):
        return Attached(name, why=not_text(name, content_type))
    if size > max_bytes:
        return Attached(name, why=TOO_LARGE.format(size=file_size(size), limit=file_size(max_bytes)))
    return None


def decode(data: bytes) -> str | None:
    """The file's text: UTF-8 (or UTF-16 with its byte-order mark), undecodable bytes replaced; None when it is not
    text (it holds NUL bytes)."""
    if data.startswith(UTF16_BOMS):
        return data.decode("utf-16", errors="replace")
    if b"\0" in data:
        return None
    return data.decode("utf-8-sig", errors="replace")


def read(name: str, data: bytes) -> Attached:
    """A fetched file as the turn shows it: its text, or that it is not text after all."""
    text = decode(data)
    return Attached(name, why=NOT_TEXT) if text is None else Attached(name, text=text)


def join_turn(text: str, files: Sequence[Attached]) -> str:
    """The user turn: the message's text, each file that was read, then one line for each file that was not."""
    parts = [text] if text else []
    parts += [_block(file.name, file.text) for file in files if file.text is not None]
    unread = [f"{_introduced(file.name)} {file.why}" for file in files if file.text is None]
    if unread:
        parts.append("\n".join(unread))
    return "\n\n".join(parts)


def with_text(turn: str, text: str, names: Sequence[str]) -> str:
    """A stored turn after an edit of its message: the new `text`, then the files as they were read. Discord lets an
    edit remove a message's files but not add any, so nothing is fetched again (a fetch could fail, or land after a
    later edit). `names` are the files the message still has; with none left, the turn is the text alone."""
    starts = [at for at in (_section_start(turn, _introduced(name)) for name in names) if at != -1]
    if not starts:
        return text
    files = turn[min(starts) :]
    return f"{text}\n\n{files}" if text else files


def _section_start(turn: str, header: str) -> int:
    """Where a file's part begins: its header at the start of the turn or after a blank line; -1 if absent."""
    at = turn.find(header)
    while at > 0 and turn[at - 2 : at] != "\n\n":
        at = turn.find(header, at + 1)
    return at


def _introduced(name: str) -> str:
    """The file's name on one line of its own, without backticks that could open a code block."""
    return ATTACHED.format(name=" ".join(name.replace("`", "").split()))


def _block(name: str, text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text.strip("\n")  # blank lines at the ends only; indentation stays
    return f"{_introduced(name)}\n{fence}\n{body}\n{fence}"
