"""The one escaping of text that came from a file or a name on its way to the terminal (class names, file
names, per-file errors, run and study names, paths): `one_line` for plain output, `safe` for Rich markup,
`json_text` for --json lines. Every command and the progress lines use these; nothing else escapes.
"""

from __future__ import annotations

import json

from rich.markup import escape


def one_line(text: str) -> str:
    """THE escaping of anything that came from a file or a name (class names, file names, per-file errors, run
    and study names) on its way to the terminal: every character that is not printable is written as its
    Python escape (a newline → \\n, ESC → \\x1b, a bell → \\x07, C1 controls, bidirectional overrides →
    \\u202e), so that no such text can move the cursor, clear the screen, colour the output or break a line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def safe(text: object) -> str:
    """`one_line(str(text))`, also escaped for Rich markup ('[red]' in a name stays text): for `out.print`."""
    return escape(one_line(str(text)))


def json_text(obj: object) -> str:
    """`obj` as one line of JSON for the terminal: non-ASCII text kept, but every character `one_line` would
    escape written as a JSON \\u escape (json.dumps leaves C1 controls and U+2028 raw)."""
    text = json.dumps(obj, ensure_ascii=False)
    return "".join(c if c.isprintable() or c == " " else _json_escape(c) for c in text)


def _json_escape(c: str) -> str:
    n = ord(c)
    if n <= 0xFFFF:
        return f"\\u{n:04x}"
    n -= 0x10000
    return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"
