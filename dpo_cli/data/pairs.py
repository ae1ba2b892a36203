"""Preference pairs in the common shapes: explicit prompt ({prompt, chosen, rejected} strings) or
implicit prompt ({chosen, rejected} only, each the whole text).

With an implicit prompt, the prompt is the longest common prefix of chosen and rejected, cut
back to the end of the last "\\n\\nAssistant:" turn marker inside it (dialogues), else to the
last white space (so that no word is split between prompt and response). Rows whose texts share
no such prefix are dropped with the reason.
"""

from __future__ import annotations

import os

from dpo_cli.data.fields import text_field

ASSISTANT = "\n\nAssistant:"


def split_implicit(chosen: str, rejected: str) -> dict[str, str] | str:
    """{prompt, chosen, rejected} from two whole texts, or the reason they cannot be split."""
    shared = os.path.commonprefix([chosen, rejected])
    turn = shared.rfind(ASSISTANT)
    if turn >= 0:
        cut = turn + len(ASSISTANT)
    else:
        cut = max(shared.rfind(" "), shared.rfind("\n"), shared.rfind("\t"))
    if cut <= 0:
        return "no shared prompt (chosen and rejected differ from the start)"
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


def normalize(row: dict) -> dict[str, str] | str:
    chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
    if "prompt" in row:
        return {"prompt": text_field(row, "prompt"), "chosen": chosen, "rejected": rejected}
    return split_implicit(chosen, rejected)
