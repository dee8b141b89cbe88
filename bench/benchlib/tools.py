"""What the bench needs on the machine: paths, installs when missing, builds, versions.

- wrk and nginx: `apt-get update` then `apt-get install -y` (through `sudo -n` when not root),
  only when the binary is absent and a selected configuration needs it;
- pm2: `npm install --prefix bench/.tools pm2` (bench/.tools is git-ignored); PM2_HOME is
  bench/.tools/pm2-home, so nothing lands in ~/.pm2;
- reuse-launch: `cargo build --release` every run (a no-op when up to date), so the bench
  measures the source it sits next to;
- hello.c: compiled with gcc into bench/.tools/build when the source is newer than the binary.

Nothing here downloads anything but those packages.
"""
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional


class ToolError(Exception):
    """A tool the selected cells need could not be installed or built."""


@dataclass(frozen=True)
class Paths:
    repo: Path

    @property
    def bench(self) -> Path:
        return self.repo / "bench"

    @property
    def tools(self) -> Path:
        return self.bench / ".tools"

    @property
    def build(self) -> Path:
        return self.tools / "build"

    @property
    def pm2_home(self) -> Path:
        return self.tools / "pm2-home"

    @property
    def pm2(self) -> Path:
        return self.tools / "node_modules" / ".bin" / "pm2"

    @property
    def launcher(self) -> Path:
        return self.repo / "target" / "release" / "reuse-launch"

    @property
    def workers(self) -> Path:
        return self.bench / "workers"

    @property
    def hello_js(self) -> Path:
        return self.workers / "hello.js"

    @property
    def cluster_js(self) -> Path:
        return self.workers / "cluster.js"

    @property
    def hello_c_src(self) -> Path:
        return self.workers / "hello.c"

    @property
    def hello_c(self) -> Path:
        return self.build / "hello-c"

    @property
    def stats_lua(self) -> Path:
        return self.bench / "wrk" / "stats.lua"

    @property
    def results(self) -> Path:
        return self.bench / "results"


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _run(argv: List[str], timeout: float = 900, env: Optional[Dict[str, str]] = None,
         cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def _root_prefix() -> List[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        return ["sudo", "-n"]
    raise ToolError("installing packages needs root or sudo")


def ensure_apt(binaries: Dict[str, str]) -> None:
    """Install the Debian packages of the binaries (name -> package) that are not on PATH."""
    missing = sorted({pkg for binary, pkg in binaries.items() if not find_binary(binary)})
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise ToolError(f"{', '.join(missing)} missing and there is no apt-get")
    prefix = _root_prefix()
    say(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (prefix + ["apt-get", "update", "-q"], prefix + ["apt-get", "install", "-y", "-q", *missing]):
        done = _run(argv, env=env)
        if done.returncode != 0:
            raise ToolError(f"{' '.join(argv)} failed: {done.stderr.strip()[-400:]}")
    still = [b for b in binaries if not find_binary(b)]
    if still:
        raise ToolError(f"still missing after apt-get: {', '.join(still)}")


def find_binary(name: str) -> Optional[str]:
    """`which`, also looking in the sbin directories (nginx lives in /usr/sbin)."""
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def ensure_pm2(paths: Paths) -> None:
    if paths.pm2.exists():
        return
    if not shutil.which("npm"):
        raise ToolError("pm2 missing and there is no npm")
    say(f"installing pm2 into {paths.tools} with npm")
    paths.tools.mkdir(parents=True, exist_ok=True)
    done = _run(["npm", "install", "--prefix", str(paths.tools), "--no-audit", "--no-fund", "pm2"])
    if done.returncode != 0 or not paths.pm2.exists():
        raise ToolError(f"npm install pm2 failed: {done.stderr.strip()[-400:]}")


def build_launcher(paths: Paths) -> Optional[str]:
    """`cargo build --release`. Returns a note when the build failed but an older binary exists
    (the report says so); raises when there is no binary at all."""
    say("cargo build --release")
    done = _run(["cargo", "build", "--release", "--quiet"], cwd=paths.repo)
    if done.returncode == 0:
        return None
    errors = "; ".join(line.strip() for line in done.stderr.splitlines() if line.startswith("error"))
    if paths.launcher.exists():
        return ("cargo build --release failed (the source was probably being edited), so this run measured "
                f"the existing {paths.launcher.relative_to(paths.repo)}: {errors[:300]}")
    raise ToolError(f"cargo build --release failed: {errors[:600]}")


def build_hello_c(paths: Paths) -> None:
    src, binary = paths.hello_c_src, paths.hello_c
    if binary.exists() and binary.stat().st_mtime >= src.stat().st_mtime:
        return
    if not shutil.which("gcc"):
        raise ToolError("gcc missing: cannot build bench/workers/hello.c")
    paths.build.mkdir(parents=True, exist_ok=True)
    done = _run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(src)])
    if done.returncode != 0:
        raise ToolError(f"gcc hello.c failed: {done.stderr.strip()[-600:]}")


def pm2_env(paths: Paths) -> Dict[str, str]:
    return {"PM2_HOME": str(paths.pm2_home)}


def _first_line(argv: List[str], env: Optional[Dict[str, str]] = None) -> str:
    if not find_binary(argv[0]) and not Path(argv[0]).exists():
        return "absent"
    try:
        done = _run(argv, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    text = (done.stdout.strip() or done.stderr.strip()).splitlines()
    return text[0].strip() if text else "unknown"


def versions(paths: Paths) -> Dict[str, str]:
    """One line per tool, for the report header."""
    pm2_env_full = dict(os.environ, **pm2_env(paths))
    wrk = _first_line(["wrk", "--version"]).split(" Copyright")[0]
    return {
        "reuse-launch": _first_line([str(paths.launcher), "--version"]),
        "wrk": wrk,
        "node": _first_line(["node", "--version"]),
        "nginx": _first_line([find_binary("nginx") or "nginx", "-v"]).replace("nginx version: ", ""),
        "pm2": _first_line([str(paths.pm2), "--version"], env=pm2_env_full) if paths.pm2.exists() else "absent",
        "gcc": _first_line(["gcc", "--version"]),
    }
