"""scripts/system-packages.sh, which scripts/test.sh runs first: what it installs, and how, in each case (root,
sudo, neither, CPC_NO_APT=1, apt-get failing). dpkg-query, apt-get, id and sudo are stand-ins on a PATH that
holds nothing else but the few tools the script uses, so these tests change nothing on the machine."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

SCRIPT = REPO / "scripts" / "system-packages.sh"
PACKAGES = ["libportaudio2", "pulseaudio", "pulseaudio-utils", "libasound2-plugins", "libespeak-ng1"]
TOOLS = ("bash", "env", "dirname", "cat", "rm", "mktemp", "true")

STANDINS = {
    # installed packages are the words of $INSTALLED
    "dpkg-query": 'for p in $INSTALLED; do [ "$p" = "${@: -1}" ] && { printf installed; exit 0; }; done\n'
    'echo "dpkg-query: no packages found matching ${@: -1}" >&2; exit 1\n',
    "apt-get": 'echo "apt-get $*" >>"$LOG"; [ -z "${APT_FAILS:-}" ] || { echo "E: $APT_FAILS" >&2; exit 100; }\n',
    "id": 'echo "$UID_IS"\n',
    "sudo": '[ "$1" = -n ] && { shift; [ -n "${SUDO_OK:-}" ] || exit 1; }\necho "sudo $*" >>"$LOG"; exec "$@"\n',
}


def run_script(
    tmp_path: Path, installed=(), uid=0, sudo=None, **env
) -> tuple[subprocess.CompletedProcess, list]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in TOOLS:
        (bin_dir / tool).unlink(missing_ok=True)
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, body in STANDINS.items():
        if name == "sudo" and sudo is None:
            (bin_dir / name).unlink(missing_ok=True)
            continue
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    env = {"PATH": str(bin_dir), "LOG": str(log), "INSTALLED": " ".join(installed), "UID_IS": str(uid),
           **({"SUDO_OK": "1"} if sudo == "passwordless" else {}), **env}  # fmt: skip
    r = subprocess.run(
        [shutil.which("bash"), str(SCRIPT)], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    return r, log.read_text().splitlines()


def test_quiet_and_no_apt_get_when_everything_is_installed(tmp_path):
    r, calls = run_script(tmp_path, installed=PACKAGES)
    assert (r.returncode, r.stdout, r.stderr, calls) == (0, "", "", [])


def test_root_updates_then_installs_exactly_what_is_missing(tmp_path):
    r, calls = run_script(tmp_path, installed=["pulseaudio", "libasound2-plugins"])
    assert r.returncode == 0, r.stderr
    missing = "libportaudio2 pulseaudio-utils libespeak-ng1"
    assert calls == ["apt-get update -qq", f"apt-get install -y -qq --no-install-recommends {missing}"]
    assert r.stdout == f"test.sh: installing {missing} (apt-get)\n"


def test_a_user_with_sudo_installs_through_sudo(tmp_path):
    r, calls = run_script(tmp_path, installed=PACKAGES[1:], uid=1000, sudo="passwordless")
    assert r.returncode == 0, r.stderr
    assert calls == [
        "sudo true",  # sudo -n true: no password needed
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq",
        "apt-get update -qq",
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libportaudio2",
        "apt-get install -y -qq --no-install-recommends libportaudio2",
    ]
    assert "through sudo" in r.stdout


@pytest.mark.parametrize(
    "case, uid, sudo, env",
    [
        ("not root, no sudo", 1000, None, {}),
        ("not root, sudo needs a password and there is no terminal", 1000, "asks for a password", {}),
        ("CPC_NO_APT=1", 0, None, {"CPC_NO_APT": "1"}),
    ],
)
def test_without_root_or_sudo_one_line_names_what_is_missing(tmp_path, case, uid, sudo, env):
    r, calls = run_script(
        tmp_path, installed=["libespeak-ng1", "pulseaudio-utils"], uid=uid, sudo=sudo, **env
    )
    assert r.returncode == 0 and r.stdout == "" and calls == []
    missing = "libportaudio2 pulseaudio libasound2-plugins"
    assert r.stderr == (
        f"test.sh: missing {missing} ({case}): the tests that need them skip; "
        f"to run them: sudo apt-get install --no-install-recommends {missing}\n"
    )


def test_an_apt_get_failure_stops_the_run_with_its_message(tmp_path):
    r, calls = run_script(tmp_path, APT_FAILS="Unable to locate package libespeak-ng1")
    assert r.returncode == 1
    assert calls == ["apt-get update -qq"]  # install is not attempted after update failed
    assert "E: Unable to locate package libespeak-ng1" in r.stderr
    assert "apt-get could not install libportaudio2" in r.stderr


def test_the_readme_test_command_is_what_ci_runs():
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "bash scripts/test.sh" and all(not line.startswith(("apt", "sudo")) for line in ci)
    test_sh = (REPO / "scripts/test.sh").read_text()
    assert "bash scripts/system-packages.sh" in test_sh and "bash scripts/setup.sh" in test_sh
    assert os.access(SCRIPT, os.X_OK)
