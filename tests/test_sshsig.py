"""ingest/sshsig.py against OpenSSH itself: what sign() makes, `ssh-keygen -Y verify` accepts (and writes the same
bytes), what ssh-keygen signs, verify() accepts, and both refuse changed data or another namespace; a key file
the tool cannot sign with is one ConfigError line that names it and holds none of the key."""

from __future__ import annotations

import os
import shutil
import subprocess
import traceback
from pathlib import Path

import pytest

from ingest import sshsig
from ingest.errors import ConfigError

SSH_KEYGEN = shutil.which("ssh-keygen")
NAMESPACE = "audit-ingest-evidence"
IDENTITY = "auditor@example.com"
DATA = b'{"files": {"events.parquet": "sha256:00ff"}}\n'


def ssh_keygen(*args: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    if SSH_KEYGEN is None:
        if os.environ.get("CI"):
            pytest.fail("ssh-keygen is not installed (.ci/run installs it)", pytrace=False)
        pytest.skip("ssh-keygen is not installed: apt-get install -y --no-install-recommends openssh-client")
    return subprocess.run([SSH_KEYGEN, *map(str, args)], input=stdin, capture_output=True, timeout=60)


def new_key(tmp_path: Path, name: str = "evidence", *options: str) -> Path:
    path = tmp_path / name
    generated = ssh_keygen("-q", "-t", "ed25519", "-N", "", "-C", "evidence@host", *options, "-f", path)
    assert generated.returncode == 0, generated.stderr
    return path


def openssh_verifies(tmp_path: Path, key: sshsig.SigningKey, signature: str, data: bytes, namespace: str) -> bool:
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"{IDENTITY} {sshsig.public_key_line(key)}\n")
    sig = tmp_path / "manifest.json.sig"
    sig.write_text(signature)
    verified = ssh_keygen("-Y", "verify", "-f", allowed, "-I", IDENTITY, "-n", namespace, "-s", sig, stdin=data)
    checked = ssh_keygen("-Y", "check-novalidate", "-n", namespace, "-s", sig, stdin=data)
    assert verified.returncode == checked.returncode, (verified.stderr, checked.stderr)
    return verified.returncode == 0


def test_a_signature_made_by_sign_verifies_with_ssh_keygen_and_is_the_bytes_ssh_keygen_writes(tmp_path):
    path = new_key(tmp_path)
    key = sshsig.load_signing_key(path)
    signature = sshsig.sign(key, DATA, NAMESPACE)
    assert openssh_verifies(tmp_path, key, signature, DATA, NAMESPACE)

    # Ed25519 signatures are deterministic, so ssh-keygen's own of the same data is the same file.
    (tmp_path / "manifest.json").write_bytes(DATA)
    signed = ssh_keygen("-Y", "sign", "-f", path, "-n", NAMESPACE, tmp_path / "manifest.json")
    assert signed.returncode == 0, signed.stderr
    assert (tmp_path / "manifest.json.sig").read_text() == signature
    assert all(len(line) <= 70 for line in signature.splitlines())


def test_the_public_key_line_is_the_one_ssh_keygen_wrote(tmp_path):
    path = new_key(tmp_path)
    assert sshsig.public_key_line(sshsig.load_signing_key(path)) == path.with_suffix(".pub").read_text().strip()


def test_a_signature_made_by_ssh_keygen_verifies_with_verify(tmp_path):
    path = new_key(tmp_path)
    (tmp_path / "manifest.json").write_bytes(DATA)
    signed = ssh_keygen("-Y", "sign", "-f", path, "-n", NAMESPACE, tmp_path / "manifest.json")
    assert signed.returncode == 0, signed.stderr
    signature = (tmp_path / "manifest.json.sig").read_text()
    line = sshsig.public_key_line(sshsig.load_signing_key(path))
    assert sshsig.verify(signature, DATA, NAMESPACE, line)
    assert sshsig.verify(signature, DATA, NAMESPACE, f"{IDENTITY} {line}")  # an allowed_signers line does too


def test_a_changed_byte_of_data_fails_ssh_keygen_and_verify(tmp_path):
    key = sshsig.load_signing_key(new_key(tmp_path))
    signature = sshsig.sign(key, DATA, NAMESPACE)
    changed = DATA.replace(b"00ff", b"00fe")
    assert not openssh_verifies(tmp_path, key, signature, changed, NAMESPACE)
    assert not sshsig.verify(signature, changed, NAMESPACE, sshsig.public_key_line(key))


def test_the_wrong_namespace_fails_ssh_keygen_and_verify(tmp_path):
    key = sshsig.load_signing_key(new_key(tmp_path))
    signature = sshsig.sign(key, DATA, "file")
    assert not openssh_verifies(tmp_path, key, signature, DATA, NAMESPACE)
    assert not sshsig.verify(signature, DATA, NAMESPACE, sshsig.public_key_line(key))


def test_another_key_or_a_mangled_signature_fails_verify(tmp_path):
    key = sshsig.load_signing_key(new_key(tmp_path))
    other = sshsig.load_signing_key(new_key(tmp_path, "other"))
    signature = sshsig.sign(key, DATA, NAMESPACE)
    assert not sshsig.verify(signature, DATA, NAMESPACE, sshsig.public_key_line(other))
    lines = signature.splitlines()
    for mangled in ("", "garbage", "\n".join(lines[:1] + lines[2:]), signature.replace(lines[2], lines[2][::-1])):
        assert not sshsig.verify(mangled, DATA, NAMESPACE, sshsig.public_key_line(key))


def bad_key_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (the file, words its error must hold)."""
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(300))
    rsa = tmp_path / "rsa"
    assert ssh_keygen("-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", rsa).returncode == 0
    protected = tmp_path / "protected"
    assert ssh_keygen("-q", "-t", "ed25519", "-N", "correct horse battery", "-f", protected).returncode == 0
    return {
        "missing": (tmp_path / "absent", "cannot read it"),
        "a directory": (tmp_path, "cannot read it"),
        "garbage": (garbage, "not an OpenSSH private key"),
        "the public half": (new_key(tmp_path).with_suffix(".pub"), "not an OpenSSH private key"),
        "an RSA key": (rsa, "ssh-rsa, not ssh-ed25519"),
        "a passphrase-protected key": (protected, "passphrase-protected"),
    }


def test_each_bad_key_file_is_one_config_error_line_without_key_material(tmp_path):
    for name, (path, words) in bad_key_files(tmp_path).items():
        with pytest.raises(ConfigError) as raised:
            sshsig.load_signing_key(path)
        message = str(raised.value)
        assert "\n" not in message and str(path) in message and words in message, (name, message)
        debug = "".join(traceback.format_exception(raised.value))  # what --debug prints, chained causes included
        if path.is_file():
            secret = path.read_text(errors="replace").splitlines()[1:-1] or [path.read_text(errors="replace")]
            assert not any(len(line) >= 16 and line in debug for line in secret), name
        assert "correct horse" not in debug, name


def test_a_signing_keys_repr_holds_none_of_it(tmp_path):
    path = new_key(tmp_path)
    key = sshsig.load_signing_key(path)
    assert repr(key) == "SigningKey(comment='evidence@host')"
