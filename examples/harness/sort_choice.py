"""The data of sort_choice.yaml: sort_choice.jsonl beside this file, read from any working directory.

(A task YAML can name a local file directly, `dataset_path: json` with
`dataset_kwargs: {data_files: {test: PATH}}`, but lm_eval reads a relative PATH from the working
directory, not from the YAML's: this loader makes the example run from anywhere.)
"""

from pathlib import Path


def load(**_metadata):
    """The rows of sort_choice.jsonl as the `test` split (lm_eval passes the task's metadata)."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("sort_choice.jsonl"))})
