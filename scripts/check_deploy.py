"""Cross-checks the deployment artifacts against what the binaries really do.

Called by scripts/check-deploy after the release build. Reads each binary's `--help` (clap
lists every environment variable it reads as `[env: NAME=...]`), then checks that:
- every ENTRYPOINT and HEALTHCHECK binary of deploy/Dockerfile exists, runs, and (for a
  HEALTHCHECK) has a `healthcheck` subcommand, and every binary the image copies is built;
- every environment variable docker-compose.yml sets for a service is one that service reads,
  and every setting of the README's configuration table is set for the services it names;
- every key of the Kubernetes ConfigMap is read by some service.
"""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
SERVICES = ["ingest", "transcriber", "notifier"]
failures = []


def fail(message):
    failures.append(message)


def env_vars(binary):
    """The environment variables a binary reads, from its --help."""
    help_text = subprocess.run([RELEASE / binary, "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\[env: ([A-Z0-9_]+)[=\]]", help_text))


reads = {s: env_vars(s) for s in SERVICES}
# Read by every binary through tracing's filter, not by clap.
for names in reads.values():
    names.add("RUST_LOG")

# --- Dockerfile -------------------------------------------------------------------------
dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
for binary in re.findall(r'ENTRYPOINT \["/usr/local/bin/([a-z]+)"', dockerfile):
    if subprocess.run([RELEASE / binary, "--version"], capture_output=True).returncode != 0:
        fail(f"Dockerfile ENTRYPOINT {binary}: target/release/{binary} does not run")
for binary in re.findall(r'HEALTHCHECK .*CMD \["/usr/local/bin/([a-z]+)", "healthcheck"\]', dockerfile):
    if subprocess.run([RELEASE / binary, "help", "healthcheck"], capture_output=True).returncode != 0:
        fail(f"Dockerfile HEALTHCHECK: {binary} has no healthcheck subcommand")
for copied in re.findall(r"/src/target/release/([a-z]+)", dockerfile):
    if not (RELEASE / copied).exists():
        fail(f"Dockerfile copies target/release/{copied}, which the build does not produce")

# --- docker-compose.yml -----------------------------------------------------------------
compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
compose_env = {}
for service in SERVICES:
    env = compose["services"][service].get("environment") or {}
    compose_env[service] = set(env)
    for name in sorted(set(env) - reads[service]):
        fail(f"docker-compose.yml sets {name} for {service}, which {service} does not read")

readme = (ROOT / "README.md").read_text()
for name, used_by in re.findall(r"^\| `([A-Z0-9_]+)` \| [^|]* \| ([^|]+) \|", readme, re.M):
    targets = SERVICES if used_by.strip() == "all" else [s.strip() for s in used_by.split(",")]
    for service in targets:
        if service not in SERVICES:
            continue
        if name not in reads[service] and name != "RUST_LOG":
            fail(f"README says {service} reads {name}, but its --help does not list it")
        if name not in compose_env[service]:
            fail(f"README setting {name} (for {service}) is not available in docker-compose.yml")

# --- Kubernetes -------------------------------------------------------------------------
everything = set().union(*reads.values())
for doc in yaml.safe_load_all(Path(sys.argv[1]).read_text()):
    if doc and doc.get("kind") == "ConfigMap":
        for name in sorted(set(doc.get("data", {})) - everything):
            fail(f"the Kubernetes ConfigMap sets {name}, which no service reads")

if failures:
    print("deployment checks failed:\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(1)
print(f"checked: Dockerfile entrypoints, {sum(map(len, compose_env.values()))} compose settings, the ConfigMap")
