"""A checkout of this project in a temporary folder: the files git knows (tracked, and new ones it
does not ignore) copied, the installed virtual environments linked, a git repository of its own."""
import shutil
import subprocess
from pathlib import Path

from ground.settings import PROJECT_ROOT


def copy_checkout(root: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=PROJECT_ROOT, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = PROJECT_ROOT / rel
        if src.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    for venv in (".venv", ".venv-dvc"):
        (root / venv).symlink_to(PROJECT_ROOT / venv)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root
