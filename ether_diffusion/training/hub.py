"""``--push_to_hub``: the output a run leaves for others (the adapter file, its model card, the sample grid and the
validation images) uploaded to a Hugging Face Hub model repository with ``huggingface_hub`` (an optional dependency:
``pip install 'ether-diffusion[hub]'``). Checkpoints, class images and logs stay local.

The repository is created (or found) before training, so a missing login fails in seconds, not after the run; the
upload is one commit at the end. The token (``--hub_token``, else huggingface_hub's own login) is never written
anywhere by the run.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["HubError", "create_repository", "upload_output", "uploaded_patterns"]


class HubError(RuntimeError):
    """The Hub could not be reached or refused the repository or the upload; the message says what to do."""


def uploaded_patterns(weight_name: str) -> list[str]:
    """What of the output folder goes to the Hub (``huggingface_hub``'s ``allow_patterns``)."""
    return [weight_name, "README.md", "samples.png", "validation/*.png"]


def create_repository(repo_id: str | None, output_dir: Path, token: str | None) -> str:
    """Create ``repo_id`` (default: the output folder's name) if it does not exist; returns its full id."""
    import huggingface_hub

    name = repo_id or Path(output_dir).resolve().name
    try:
        return huggingface_hub.create_repo(name, exist_ok=True, token=token).repo_id
    except Exception as err:  # offline, not logged in, no permission: huggingface_hub raises several kinds
        raise HubError(
            f"--push_to_hub: the Hub repository '{name}' could not be created or reached ({type(err).__name__}: "
            f"{err}). Log in with `hf auth login` or pass --hub_token, check --hub_model_id, or drop --push_to_hub; "
            "nothing has been trained yet"
        ) from err


def upload_output(repo_id: str, output_dir: Path, weight_name: str, token: str | None, message: str):
    """Upload the adapter, the model card and the images of ``output_dir`` to ``repo_id`` in one commit."""
    import huggingface_hub

    try:
        return huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            allow_patterns=uploaded_patterns(weight_name),
            commit_message=message,
            token=token,
        )
    except Exception as err:
        raise HubError(
            f"--push_to_hub: uploading to '{repo_id}' failed ({type(err).__name__}: {err}). The trained adapter is "
            f"saved in '{output_dir}'; upload it later with `hf upload {repo_id} {output_dir}`"
        ) from err
