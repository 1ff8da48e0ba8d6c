"""openai-audit-ingest: an exact copy of an OpenAI organization's audit log in your warehouse."""

import sys

__version__ = "0.1.0"

# httpx imports its command-line tool, and with it rich's and pygments' machinery, whenever those are
# installed: a third of httpx's import time, paid by every run. A None module makes that import fail,
# which httpx expects: it then leaves the tool out.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
