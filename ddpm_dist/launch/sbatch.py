"""Submit an sbatch training script with its settings resolved now, at submission:

    python launch/sbatch.py [sbatch options] launch/train_lsun.sh [key=value ...]

takes what `sbatch` takes. Plain `sbatch launch/train_lsun.sh` resolves the config when the job
first starts, so an edit of the YAML file made while the job waits in the queue (hours, maybe)
reaches it. Here the script itself resolves the settings first (run outside a job with
DDPM_RESOLVE_ONLY: the same defaults, DDPM_* variables and key=value arguments) into
OUT_DIR/slurm-submit-<time>-<random>-config.yaml; then sbatch submits it with
DDPM_CONFIG_SNAPSHOT naming that file, and every run of the job trains with it unchanged.
sbatch's own output is passed on (`--parsable` works); the file's name goes to stderr.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

USAGE = "usage: python launch/sbatch.py [sbatch options] SCRIPT.sh [key=value ...]"


def split_command(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(sbatch options, the script, key=value settings): the script is the first argument that
    does not start with '-' and names an existing `.sh` file, as on sbatch's command line."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-") and arg.endswith(".sh") and Path(arg).is_file():
            return argv[:i], arg, argv[i + 1:]
    raise ValueError(f"no training script (an existing .sh file) among the arguments; {USAGE}")


def resolve(script: str, overrides: list[str]) -> str:
    """The path of the resolved config the script wrote for this submission."""
    name = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    env = dict(os.environ, DDPM_RESOLVE_ONLY=name, SLURM_SUBMIT_DIR=os.getcwd())  # as sbatch will set it
    env.pop("DDPM_CONFIG_SNAPSHOT", None)
    env.setdefault("DDPM_PYTHON", sys.executable)  # the interpreter running this, e.g. the venv's
    proc = subprocess.run(["bash", script, *overrides], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not proc.stdout.strip():
        why = (proc.stderr.strip().splitlines() or [f"{script} resolved nothing"])[-1]  # the script's error line
        raise ValueError(why.removeprefix("error: "))
    return proc.stdout.strip().splitlines()[-1]


def with_snapshot(options: list[str], snapshot: str) -> list[str]:
    """sbatch passes the whole environment by default; an --export list (an option or
    SBATCH_EXPORT) must name DDPM_CONFIG_SNAPSHOT as well."""
    item, options = f"DDPM_CONFIG_SNAPSHOT={snapshot}", list(options)
    exports = [i for i, o in enumerate(options) if o.startswith("--export=") or o == "--export"]
    if not exports and not os.environ.get("SBATCH_EXPORT"):
        return options
    if "," in snapshot:
        raise ValueError(f"{snapshot}: a comma would split sbatch's --export list; choose another DDPM_OUT_DIR")
    if not exports:
        return options + [f"--export={os.environ['SBATCH_EXPORT']},{item}"]
    i = exports[-1] + (options[exports[-1]] == "--export")  # the last one counts; its value
    options[i] += "," + item
    return options


def submit(argv: list[str]) -> int:
    options, script, overrides = split_command(argv)
    snapshot = resolve(script, overrides)
    try:
        command = ["sbatch", *with_snapshot(options, snapshot), script]
        returncode = subprocess.run(command, env=dict(os.environ, DDPM_CONFIG_SNAPSHOT=snapshot),
                                    timeout=300).returncode  # sbatch prints the job id, or why not
    except BaseException:
        os.unlink(snapshot)
        raise
    if returncode != 0:
        os.unlink(snapshot)  # no job will read it
        return returncode
    print(f"the job trains with {snapshot}, resolved now", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    try:
        return submit(argv)
    except (ValueError, OSError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
