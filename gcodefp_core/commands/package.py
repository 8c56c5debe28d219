"""`gcodefp package`: build, promote, roll back, list and verify deployment packages."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("package", help="build, promote, roll back, list and verify deployment packages",
                       description="Manage <registry>/packages/<version>/ and the CURRENT/PREVIOUS pointers.")
    psub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = psub.add_parser("build", help="package an exported model folder (model.json + graphs)")
    b.add_argument("model_dir", type=Path)
    b.add_argument("--registry", type=Path, required=True)
    b.add_argument("--version", help="package version (default: v<UTC timestamp>-<hash>)")
    b.add_argument("--benchmark", type=Path, help="benchmark JSON to ship in the package")
    b.add_argument("--metrics", type=Path, help="metrics JSON for the model card (default: model.json's)")
    b.add_argument("--promote", action="store_true", help="make it CURRENT once built")
    b.set_defaults(handler=_build)
    for name, helptext in (("promote", "verify a package and make it CURRENT"),
                           ("verify", "check a package's checksums")):
        q = psub.add_parser(name, help=helptext)
        q.add_argument("version")
        q.add_argument("--registry", type=Path, required=True)
        q.set_defaults(handler=_promote if name == "promote" else _verify)
    for name, helptext in (("rollback", "serve PREVIOUS again"), ("list", "list the registry's packages")):
        q = psub.add_parser(name, help=helptext)
        q.add_argument("--registry", type=Path, required=True)
        q.set_defaults(handler=_rollback if name == "rollback" else _list)


def _read_json_arg(path: Path | None, flag: str) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None


def _build(args) -> int:
    from gcodefp_core import package

    out = package.build_package(args.model_dir, args.registry, version=args.version,
                                benchmark=_read_json_arg(args.benchmark, "--benchmark"),
                                metrics=_read_json_arg(args.metrics, "--metrics"))
    print(f"built package {out.name}: {out}")
    if args.promote:
        old = package.promote(args.registry, out.name)
        print(f"CURRENT = {out.name} (was {old})")
    return 0


def _promote(args) -> int:
    from gcodefp_core import package

    old = package.promote(args.registry, args.version)
    print(f"CURRENT = {args.version} (was {old})")
    return 0


def _rollback(args) -> int:
    from gcodefp_core import package

    now = package.rollback(args.registry)
    print(f"CURRENT = {now} (rolled back from {package.previous_version(args.registry)})")
    return 0


def _verify(args) -> int:
    from gcodefp_core import package

    manifest = package.verify_package(package.package_dir(args.registry, args.version))
    print(f"{args.version}: ok ({len(manifest['files'])} files, variant {manifest.get('variant')})")
    return 0


def _list(args) -> int:
    from gcodefp_core import package

    current = package.current_version(args.registry)
    for version in package.list_versions(args.registry):
        m = json.loads((args.registry / "packages" / version / package.MANIFEST).read_text())
        mark = "*" if version == current else " "
        print(f"{mark} {version}  {m.get('variant')}  {m.get('created_at')}")
    return 0
