#!/usr/bin/env python3
"""Validates docker-compose.yml offline (no container engine needed).

Usage: scripts/check_compose.py [COMPOSE_FILE]   (default: docker-compose.yml at the repo root)

1. The compose-spec JSON schema, via `check-jsonschema --builtin-schema vendor.compose-spec`
   (PyPI check-jsonschema 0.39; installed with pip when missing).
2. Cross references, in Python (PyYAML): depends_on targets are services; named volumes, networks,
   configs and secrets used are declared; env_file and bind-mounted paths exist (relative to the
   compose file's directory, like compose resolves them); no service that runs by default depends
   on a service that only runs under a profile.

Prints what it checked; exits 1 on problems, 2 when it cannot run. Runs from any directory.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CHECK_JSONSCHEMA_VERSION = "0.39"
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, ${VAR:+alt}, $VAR; $$ escapes.
INTERPOLATION = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def check_jsonschema_cmd() -> list[str]:
    """The check-jsonschema command line, installing the package when it is missing."""
    exe = shutil.which("check-jsonschema")
    if exe:
        return [exe]
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        print(f"check-jsonschema not found; installing check-jsonschema=={CHECK_JSONSCHEMA_VERSION}.* with pip", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", f"check-jsonschema=={CHECK_JSONSCHEMA_VERSION}.*"],
            check=True,
        )
    return [sys.executable, "-m", "check_jsonschema"]


def schema_check(compose: Path) -> list[str]:
    cmd = check_jsonschema_cmd() + ["--builtin-schema", "vendor.compose-spec", str(compose)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        return [f"compose-spec schema: {line}" for line in out.splitlines() or ["check-jsonschema failed"]]
    print(f"  ok  compose-spec schema (check-jsonschema --builtin-schema vendor.compose-spec): {out}")
    return []


def interpolate(value: str) -> str:
    """Resolves compose variable interpolation the way an unset environment would: the default
    when one is given, else the empty string (the current environment is used when set)."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        val = os.environ.get(name)
        if op in (":-", "-"):
            if val is None or (op == ":-" and val == ""):
                return arg
        if op in (":+", "+"):
            return arg if val is not None and (op == "+" or val != "") else ""
        return val or ""

    return INTERPOLATION.sub(sub, value)


def as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def depends_on(svc: dict) -> list[str]:
    deps = svc.get("depends_on") or []
    return list(deps.keys()) if isinstance(deps, dict) else list(deps)


def volume_mounts(svc: dict) -> list[tuple[str, str, str]]:
    """(type, source, target) for each entry of a service's `volumes`."""
    mounts = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            mounts.append((v.get("type", "volume"), str(v.get("source") or ""), str(v.get("target") or "")))
            continue
        spec = interpolate(str(v))
        parts = spec.split(":")
        if len(parts) == 1:  # anonymous volume: just a container path
            mounts.append(("volume", "", parts[0]))
            continue
        source, target = parts[0], parts[1]
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        mounts.append((kind, source, target))
    return mounts


def env_files(svc: dict) -> list[tuple[str, bool]]:
    """(path, required) for each env_file entry."""
    out = []
    for e in as_list(svc.get("env_file")):
        if isinstance(e, dict):
            out.append((str(e.get("path", "")), bool(e.get("required", True))))
        else:
            out.append((str(e), True))
    return out


def cross_check(compose: Path) -> list[str]:
    base = compose.parent
    doc = yaml.safe_load(compose.read_text())
    services: dict = doc.get("services") or {}
    declared = {key: set((doc.get(key) or {}).keys()) for key in ("volumes", "networks", "configs", "secrets")}
    problems: list[str] = []
    counts = {"depends_on": 0, "named volumes": 0, "networks": 0, "env_file": 0, "bind mounts": 0, "configs/secrets": 0}

    def path_exists(raw: str, what: str, svc_name: str, required: bool = True) -> None:
        p = Path(os.path.expanduser(interpolate(raw)))
        p = p if p.is_absolute() else base / p
        if not p.exists():
            if required:
                problems.append(f"service {svc_name}: {what} {raw} does not exist ({p})")
            else:
                print(f"  --  service {svc_name}: optional {what} {raw} absent (required: false)")

    for name, svc in services.items():
        svc = svc or {}
        for dep in depends_on(svc):
            counts["depends_on"] += 1
            if dep not in services:
                problems.append(f"service {name}: depends_on {dep!r} is not a service")
        for kind, source, target in volume_mounts(svc):
            if kind == "volume" and source:
                counts["named volumes"] += 1
                if source not in declared["volumes"]:
                    problems.append(f"service {name}: volume {source!r} (at {target}) is not declared under top-level volumes")
            elif kind == "bind":
                counts["bind mounts"] += 1
                path_exists(source, "bind-mounted path", name)
        nets = svc.get("networks")
        for net in (nets.keys() if isinstance(nets, dict) else as_list(nets)):
            counts["networks"] += 1
            if net != "default" and net not in declared["networks"]:
                problems.append(f"service {name}: network {net!r} is not declared under top-level networks")
        for path, required in env_files(svc):
            counts["env_file"] += 1
            path_exists(path, "env_file", name, required)
        for key in ("configs", "secrets"):
            for ref in svc.get(key) or []:
                counts["configs/secrets"] += 1
                src = ref.get("source") if isinstance(ref, dict) else ref
                if src not in declared[key]:
                    problems.append(f"service {name}: {key[:-1]} {src!r} is not declared under top-level {key}")

    for key in ("configs", "secrets"):
        for cname, spec in (doc.get(key) or {}).items():
            if isinstance(spec, dict) and spec.get("file"):
                path_exists(spec["file"], f"{key[:-1]} file", f"(top-level {key}.{cname})")

    default_services = [n for n, s in services.items() if not (s or {}).get("profiles")]
    for name in default_services:
        for dep in depends_on(services[name] or {}):
            if dep in services and (services[dep] or {}).get("profiles"):
                problems.append(
                    f"service {name} runs by default but depends_on {dep!r}, which only runs under profiles {services[dep]['profiles']}"
                )
    profiled = sorted(set(services) - set(default_services))

    if not problems:
        summary = ", ".join(f"{n} {k}" for k, n in counts.items())
        print(f"  ok  cross references over {len(services)} services: {summary}")
        print(f"  ok  no default service ({', '.join(default_services)}) depends on a profile-only one ({', '.join(profiled) or 'none'})")
    return problems


def main() -> int:
    compose = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else REPO / "docker-compose.yml"
    if not compose.is_file():
        print(f"check_compose: {compose} not found", file=sys.stderr)
        return 2
    print(f"checking {compose}")
    try:
        problems = schema_check(compose)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"check_compose: cannot run check-jsonschema: {e}", file=sys.stderr)
        return 2
    try:
        problems += cross_check(compose)
    except yaml.YAMLError as e:
        problems.append(f"YAML: {e}")
    if problems:
        for p in problems:
            print(f"  FAIL {p}")
        print(f"check_compose: {len(problems)} problem(s) in {compose}", file=sys.stderr)
        return 1
    print("check_compose: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
