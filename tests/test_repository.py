"""What the repository itself promises a reader who follows the README."""

import shutil
import subprocess

import pytest

from helpers import ROOT


@pytest.mark.skipif(
    not (ROOT / ".git").exists() or not shutil.which("git"), reason="not a git checkout"
)
@pytest.mark.parametrize("path", ["certs/server.key", "certs/server.pem", "certs/client.pem"])
def test_certificates_made_by_the_readme_are_never_committed(path):
    # The README's `python -m trustme -d certs` writes a private key: `git add -A` must skip it.
    result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
    assert result.returncode == 0, f"git would commit {path}"
