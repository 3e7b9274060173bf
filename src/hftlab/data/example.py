"""The one record every stage exchanges: a (system, prompt, response) triple with labels."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    prompt: str  # the user's message
    response: str  # the assistant's message
    kind: str  # "harmful" (compliant harmful answer) | "refusal" | "task" | "chat"
    category: str = ""  # harmful category, or task name for kind == "task"
    target: str = ""  # harmful: the entity the request is about; task: the gold answer string
    system: str = ""  # optional system prompt
