"""After the final save: the model card in final/ and, with export.push_to_hub, final/ uploaded to
a Hub repo.

A push is checked when the config is validated, before any weights load (`push_problems`): the
Hugging Face libraries not told to stay offline, a token, the Hub endpoint answering, and the token
accepted (`whoami`). A push that still fails at the end (the network dropped during training)
keeps final/ as it is and says how to push it by hand (`hf upload`).
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import threading
from pathlib import Path

from dpo_cli import card, rewardformat
from dpo_cli.errors import UserError, first_line
from dpo_cli.hub import hub_reachable, offline_setting
from dpo_cli.schema import Config, ExportConfig, as_plain

log = logging.getLogger(__name__)


WHOAMI_TIMEOUT = 20.0  # seconds the Hub gets to answer whether it accepts the token


@functools.lru_cache(maxsize=4)
def _whoami_problem(endpoint: str, token: str) -> str | None:
    """Why the Hub refuses `token` (or cannot say), or None; asked once per process (validation
    runs before Hydra starts, and again inside the job). huggingface_hub sets no timeout on this
    request: an endpoint that accepts the connection and never answers would hang the start, so
    the answer is awaited in a thread for WHOAMI_TIMEOUT seconds (the thread is left behind)."""
    from huggingface_hub import HfApi

    found: list[str | None] = []

    def ask() -> None:
        try:
            HfApi(endpoint=endpoint).whoami(token=token)
            found.append(None)
        except Exception as e:  # noqa: BLE001 - an HTTP 401, or whatever the connection raised
            found.append(first_line(e))

    thread = threading.Thread(target=ask, daemon=True, name="hub-whoami")
    thread.start()
    thread.join(WHOAMI_TIMEOUT)
    return found[0] if found else f"{endpoint} did not answer within {WHOAMI_TIMEOUT:.0f} s"


def push_problems(e: ExportConfig, mode: str) -> list[str]:
    """What keeps export.push_to_hub from working, found at start-up (empty when it is null)."""
    if e.push_to_hub is None:
        return [f"export.hub_revision={e.hub_revision!r} needs export.push_to_hub=REPO_ID"] if e.hub_revision else []
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    key = f"export.push_to_hub={e.push_to_hub!r}"
    try:
        validate_repo_id(e.push_to_hub)
    except HFValidationError as err:
        return [f"{key} is not a Hub repo id: {first_line(err)}; use e.g. export.push_to_hub=your-name/model-name"]
    if mode == "eval":  # mode=inspect checks it, as the preflight of the training run it will be
        return [f"{key} pushes a training run's final/; mode=eval writes none: remove it"]
    later = "or remove export.push_to_hub and push final/ later with `hf upload REPO_ID <run dir>/final .`"
    offline = offline_setting()
    if offline:
        return [f"{key} needs the Hub, but {offline} is set: unset {offline}, {later}"]
    problems = []
    token = get_token()
    if token is None:
        problems.append(f"{key} needs a Hugging Face token: run `hf auth login`, or set HF_TOKEN, {later}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not hub_reachable():
        problems.append(f"{key}: the Hub ({endpoint}) cannot be reached (offline?): check the network, {later}")
    elif token is not None:
        refused = _whoami_problem(endpoint, token)
        if refused:
            problems.append(
                f"{key}: the Hub's token check failed ({refused}); if the token is wrong run `hf auth login`, {later}"
            )
    return problems


def manual_command(final_dir: Path, e: ExportConfig) -> str:
    """The `hf upload` command that pushes final/ as the run would have."""
    args = ["hf", "upload", str(e.push_to_hub), str(final_dir), "."]
    if e.hub_revision:
        args += ["--revision", e.hub_revision]
    args.append("--private" if e.hub_private else "--no-private")
    return " ".join(shlex.quote(a) for a in args)


def push(final_dir: Path, e: ExportConfig) -> str:
    """Upload final/ to the repo export.push_to_hub (created, private when export.hub_private, if
    missing; a repo that exists keeps its visibility), on branch export.hub_revision (created from
    main if missing) or main; returns the commit's URL. UserError when it fails: final/ is left
    as it is and the message gives the command that pushes it by hand."""
    from huggingface_hub import HfApi

    repo, branch = str(e.push_to_hub), e.hub_revision
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"))  # the endpoint checked at start-up
    try:
        api.create_repo(repo, private=e.hub_private, exist_ok=True, repo_type="model")
        if branch:
            api.create_branch(repo, branch=branch, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo, folder_path=final_dir, revision=branch, repo_type="model",
            commit_message=f"dpo-cli: upload {final_dir.parent.name}/final",
        )  # fmt: skip
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - HTTP errors, a dropped connection, Ctrl-C
        why = "interrupted (Ctrl-C)" if isinstance(err, KeyboardInterrupt) else first_line(err)
        raise UserError(
            f"could not push {final_dir} to the Hub repo {repo}: {why}. The trained model is kept "
            f"in {final_dir}; push it by hand with: {manual_command(final_dir, e)}"
        ) from None
    return str(getattr(commit, "commit_url", None) or f"{repo}")


def finish(cfg: Config, run_dir: Path, steps: int, kept: dict[str, int], unit: str) -> None:
    """On the main process, after final/ is written: a reward model's input record, its model card,
    then the push when asked.
    A card that cannot be written is a warning (final/ is complete without it); a failed push
    a UserError (see `push`)."""
    final_dir = run_dir / "final"
    if cfg.task == "reward":  # how its inputs were built, for judge=reward_model (dpo_cli.rewardformat)
        try:
            for path in rewardformat.write(final_dir, cfg.data):
                log.info("wrote %s (how the reward model's inputs were built)", path)
        except OSError as e:
            log.warning("could not write %s in %s (%s): judge=reward_model will not find how this reward model's "
                        "inputs were built", rewardformat.RECORD, final_dir, first_line(e))  # fmt: skip
    try:
        for path in card.write(final_dir, run_dir, as_plain(cfg), steps, kept, unit):
            log.info("wrote the model card %s", path)
    except Exception as e:  # noqa: BLE001 - a full disk, an odd config: the model itself is saved
        log.warning("could not write the model card in %s: %s", final_dir, first_line(e))
    if cfg.export.push_to_hub:
        url = push(final_dir, cfg.export)
        log.info("pushed %s to the Hub: %s", final_dir, url)
