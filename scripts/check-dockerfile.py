#!/usr/bin/env python3
"""Static checks of deploy/Dockerfile's runtime targets, run by scripts/test-image.sh.

For each runtime target it follows the stage's FROM chain through the file's own stages and
checks the instructions of that chain: no RUN (the image must build without starting a
container, and nothing in it may depend on a package manager at build time), a numeric non-root
USER, a HEALTHCHECK, EXPOSE 8080, /var/lib/tidepool declared a VOLUME, and an external base
image pinned to a tag other than `latest` (or a digest). Every other image the file names
(`FROM`, `COPY --from=`) must be pinned the same way. `--self-test` checks that each rule can
fail, on doctored copies of the file.

Usage: check-dockerfile.py DOCKERFILE [TARGET...]   (default targets: runtime runtime-models)
       check-dockerfile.py --self-test DOCKERFILE
"""

import re
import sys

DEFAULT_TARGETS = ("runtime", "runtime-models")


def instructions(text):
    """(line number, KEYWORD, arguments) for each instruction, continuation lines joined."""
    out, buf, start = [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped, as docker does
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        out.append((start, keyword.upper(), args.strip()))
        buf = ""
    if buf:
        keyword, _, args = buf.partition(" ")
        out.append((start, keyword.upper(), args.strip()))
    return out


def expand(value, args):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), value)


def pinned(image):
    """An image reference with a digest, or a tag other than `latest`."""
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and not name.endswith(":latest")


def parse(text):
    """Global ARG defaults, and the stages: name -> {base, line, body}."""
    global_args, stages, current = {}, {}, None
    for number, keyword, args in instructions(text):
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            base = expand(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else f"#{len(stages)}"
            current = stages[name] = {"base": base, "line": number, "body": []}
        elif current is None:
            if keyword == "ARG":
                key, _, default = args.partition("=")
                global_args[key.strip()] = default.strip()
        else:
            current["body"].append((number, keyword, args))
    return global_args, stages


def check(text, targets):
    errors = []
    _, stages = parse(text)
    for name, stage in stages.items():
        if stage["base"] not in stages and stage["base"] != "scratch" and not pinned(stage["base"]):
            errors.append(f"line {stage['line']}: stage {name}: base image {stage['base']} is not pinned to a tag or digest")
        for number, keyword, args in stage["body"]:
            m = re.search(r"--from=(\S+)", args) if keyword == "COPY" else None
            if m and m.group(1) not in stages and (":" in m.group(1) or "/" in m.group(1)) and not pinned(m.group(1)):
                errors.append(f"line {number}: COPY --from={m.group(1)} is not pinned to a tag or digest")
    for target in targets:
        if target not in stages:
            errors.append(f"no stage named {target}")
            continue
        chain, name = [], target
        while name in stages:
            chain.append(name)
            name = stages[name]["base"]
        body = [i for stage in reversed(chain) for i in stages[stage]["body"]]
        where = f"target {target} (stages {' <- '.join(chain)})"
        for number, keyword, _ in body:
            if keyword == "RUN":
                errors.append(f"line {number}: {where} has a RUN step")
        users = [args for _, keyword, args in body if keyword == "USER"]
        if not users:
            errors.append(f"{where} has no USER")
        else:
            uid = users[-1].split(":")[0]
            if not uid.isdigit() or int(uid) == 0:
                errors.append(f"{where}: USER {users[-1]} is not a numeric non-root user")
        checks = [args for _, keyword, args in body if keyword == "HEALTHCHECK"]
        if not checks or checks[-1].upper().startswith("NONE"):
            errors.append(f"{where} has no HEALTHCHECK")
        exposed = " ".join(args for _, keyword, args in body if keyword == "EXPOSE").split()
        if "8080" not in exposed and "8080/tcp" not in exposed:
            errors.append(f"{where} does not EXPOSE 8080")
        volumes = " ".join(args for _, keyword, args in body if keyword == "VOLUME")
        if "/var/lib/tidepool" not in volumes:
            errors.append(f"{where} does not declare /var/lib/tidepool a VOLUME")
        if not pinned(name):
            errors.append(f"{where}: base image {name} is not pinned to a tag or digest")
    return errors


def self_test(text):
    """Each doctored copy must be rejected; the file itself must pass."""
    runtime_common = "FROM debian:bookworm-slim AS runtime-common\n"
    if runtime_common not in text:
        return ["self-test: the file no longer has the runtime-common stage this test doctors"]
    doctored = {
        "a RUN step": text.replace(runtime_common, runtime_common + "RUN true\n"),
        "no USER": re.sub(r"(?m)^USER .*$", "", text),
        "a root USER": re.sub(r"(?m)^USER .*$", "USER 0:0", text),
        "no HEALTHCHECK": re.sub(r"(?m)^HEALTHCHECK ", "LABEL healthcheck=none ", text),
        "an unpinned base": text.replace(runtime_common, "FROM debian AS runtime-common\n"),
        "a latest base": text.replace(runtime_common, "FROM debian:latest AS runtime-common\n"),
    }
    errors = [f"self-test: {what} was not rejected" for what, t in doctored.items() if not check(t, DEFAULT_TARGETS)]
    return errors + check(text, DEFAULT_TARGETS)


def main(argv):
    if len(argv) >= 2 and argv[1] == "--self-test":
        errors = self_test(open(argv[2], encoding="utf-8").read())
    elif len(argv) >= 2:
        errors = check(open(argv[1], encoding="utf-8").read(), argv[2:] or DEFAULT_TARGETS)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for error in errors:
        print(f"Dockerfile check: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
