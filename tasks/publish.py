"""publish: push the DVC cache to S3 and upload a versioned, self-verifying release bundle."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tlpipe.data import read_split, sha256_file
from tlpipe.errors import GateFailed, StoreError
from tlpipe.files import fresh_dir, write_json
from tlpipe.gates import Champion, Gate, champion_check, serving_check
from tlpipe.lineage import release_lineage
from tlpipe.params import Params, PublishParams
from tlpipe.registry import CANDIDATE, PRODUCTION, RegistryError, model_prefix, move_alias, read_alias
from tlpipe.report import describe_input
from tlpipe.serve import SERVING
from tlpipe.setting import primary_metric, report_sections, spec
from tlpipe.signing import SIGNATURE, sign, signing_key
from tlpipe.store import AlreadyExists, StoreSession, object_exists, open_store, read_object, upload_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# The promotion gates' outcome, beside release.json.
GATES = "gates.json"
LOCKED_STAGES = ("prepare", "validate", "pretrain", "finetune", "evaluate", "export")


@dataclass(frozen=True)
class PublishResult:
    version: str
    uri: str
    manifest_uri: str
    already_published: bool
    # The registry's aliases that name this version once published.
    aliases: tuple[str, ...] = ()
    # Why `production` was kept from this version: each failed gate, named, with its figures
    # (empty when production names it, or when publish.promote is false).
    held: tuple[str, ...] = ()

    def summary(self) -> str:
        state = "already published" if self.already_published else "published"
        aliases = f", named {', '.join(self.aliases)}" if self.aliases else ""
        held = f"; production held: {'; '.join(self.held)}" if self.held else ""
        return f"version {self.version} {state} at {self.uri}{aliases}{held}"


def release_prefix(p: PublishParams, version: str) -> str:
    return f"{model_prefix(p)}/{version}"


def check_gates(
    min_gain: float, validation: Path, evaluate_metrics: Path, parity: Path, max_abs_diff: float
) -> tuple[Gate, ...]:
    """Publishing goes only through the stage gates: re-read validate's, evaluate's and
    export's gate files and raise GateFailed on any miss; the gates passed, with their
    figures, otherwise."""
    for path in (validation, evaluate_metrics, parity):
        if not path.is_file():
            raise GateFailed(f"{path} is missing: its stage has not passed")
    checked = json.loads(validation.read_text())
    if not checked["success"]:
        raise GateFailed(
            f"validation failed {checked['failed']} of {checked['expectations']} expectations ({validation})"
        )
    gain = json.loads(evaluate_metrics.read_text())["gain"]
    if gain["ci_low"] <= min_gain:
        raise GateFailed(
            f"transfer gain in {gain['metric']} {gain['mean']:+.4f} (interval [{gain['ci_low']:+.4f}, "
            f"{gain['ci_high']:+.4f}]) is not above evaluate.min_gain {min_gain:+.4f}"
        )
    par = json.loads(parity.read_text())
    if par["max_abs_diff"] > max_abs_diff or par["argmax_agreement"] < 1.0:
        raise GateFailed(
            f"ONNX parity not met: max |Δlogit| {par['max_abs_diff']:.3e}, "
            f"argmax agreement {par['argmax_agreement']:.4f}"
        )
    interval = f"[{gain['ci_low']:+.4f}, {gain['ci_high']:+.4f}]"
    return (
        Gate(
            "validation",
            True,
            f"{checked['expectations']} expectations met",
            {"expectations": checked["expectations"]},
        ),
        Gate(
            "negative transfer",
            True,
            f"gain in {gain['metric']} {gain['mean']:+.4f}, interval {interval} above {min_gain:+.4f}",
            {**gain, "min_gain": min_gain},
        ),
        Gate(
            "ONNX parity",
            True,
            f"max |Δlogit| {par['max_abs_diff']:.2e} (at most {max_abs_diff:.0e}), argmax agreement "
            f"{par['argmax_agreement']:.2%}",
            {"max_abs_diff": par["max_abs_diff"], "argmax_agreement": par["argmax_agreement"]},
        ),
    )


def model_card(
    params: Params,
    metrics: dict[str, Any],
    parity: dict[str, Any],
    version: str,
    lineage: dict[str, Any],
    champion: Gate,
) -> str:
    """The release's README.md, a Hugging Face-style model card: YAML front matter
    (license, pipeline tag, base model, the input data sets with their hashes, and a
    model-index of the test scores: this model, the from-scratch control, the trivial
    baseline and the production model it was compared with) over what the model is, how it
    compares, its intended use and limits, and how to run it."""
    g, baseline = metrics["gate"], metrics["baseline"]
    what, shipped = report_sections(params.setting).card(params, metrics)
    source = params.data.source
    split = {"name": f"{describe_input(params.data.target)} test split", "type": params.data.target.path}
    at = f"at {g['rows']} {g['unit']}"
    scores = [
        *(
            {"type": key, "value": metrics["shipped"][key], "name": f"test {key}"}
            for key in spec(params.setting).metrics
        ),
        {"type": g["metric"], "value": g["scratch"], "name": f"from-scratch control {at}"},
        {"type": g["metric"], "value": g["transfer"], "name": f"transfer {at}"},
        {"type": g["metric"], "value": baseline["scores"][g["metric"]], "name": baseline["predictor"]},
    ]
    figures = champion.figures
    if "champion_score" in figures:
        name = f"production {figures['champion']}"
        scores.append({"type": figures["metric"], "value": figures["champion_score"], "name": name})
    front: dict[str, Any] = {
        "license": params.publish.license,
        "library_name": "onnx",
        "pipeline_tag": params.setting,
        "tags": ["tlpipe", "onnx", "transfer-learning"],
    }
    if params.pretrain.init_from is not None:
        front["base_model"] = params.pretrain.init_from
    inputs = {role: entry for role, entry in lineage["inputs"].items() if entry}  # no source: None
    front["datasets"] = [entry["path"] for entry in inputs.values()]
    front["dataset_hashes"] = {
        role: {"path": entry["path"], "rows": entry["rows"], "sha256": entry["files"]}
        for role, entry in inputs.items()
    }
    front["model-index"] = [
        {
            "name": params.publish.model_name,
            "results": [
                {"task": {"type": params.setting}, "dataset": {**split, "split": "test"}, "metrics": scores}
            ],
        }
    ]
    return "\n".join(
        [
            "---",
            yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
            "---",
            "",
            f"# {params.publish.model_name} {version}",
            "",
            what,
            "",
            f"- Target: {describe_input(params.data.target)}.",
            f"- Source: {describe_input(source) + f' ({params.data.source_kind})' if source else 'none'}.",
            f"- Test rows: {metrics['test_rows']}; the {baseline['predictor']} scores "
            f"{g['metric']} {baseline['scores'][g['metric']]:.4f}.",
            "",
            shipped,
            "",
            f"Transfer vs a from-scratch control at {g['rows']} training {g['unit']} ({g['seeds']} seeds), "
            f"test {g['metric']}: {g['transfer']:.4f} vs {g['scratch']:.4f}, gain {g['gain']:+.4f} "
            f"({g['confidence']:.0%} interval [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}]).",
            "",
            f"Against the production model when this version was first published: {champion.detail}.",
            "",
            f"ONNX parity on the test split: max |Δlogit| {parity['max_abs_diff']:.2e}, "
            f"argmax agreement {parity['argmax_agreement']:.2%}.",
            "",
            "## Intended use and limitations",
            "",
            f"For data like its target, {describe_input(params.data.target)}: every score above is "
            "measured on test rows drawn from that input, so none of them says how it fares on another "
            "domain, another period or another population; measure it there before relying on it. "
            "It inherits what its source data and starting model hold, biases included.",
            "",
            "## How to run it",
            "",
            "With onnxruntime alone, no PyTorch: `tlpipe predict --bundle "
            f"s3://{params.publish.bucket}/{release_prefix(params.publish, version)} "
            "--input FILE`, or `tlpipe lineage` for where it came from. Every file's SHA-256 is in "
            "manifest.json, signed last: a release without a good signature is incomplete and is never read.",
            "",
        ]
    )


def _lock_hashes(lock_path: Path) -> dict[str, Any]:
    if not lock_path.is_file():
        return {}
    stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {})
    return {
        name: {o["path"]: o.get("md5") for o in stages[name].get("outs", [])}
        for name in LOCKED_STAGES
        if name in stages
    }


def _git_commit(root: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD")
    return (
        {"commit": commit or None, "dirty": bool(git("status", "--porcelain"))}
        if commit
        else {"commit": None, "dirty": None}
    )


def push_dvc_cache(root: Path, store: StoreSession, remote_path: str) -> None:
    """`dvc push` every cached output to s3://<bucket>/<remote_path>; the endpoint and
    credentials come from the session's environment, never from committed config."""
    from dvc.repo import Repo

    url = f"s3://{store.bucket}/{remote_path}"
    config = {
        "core": {"remote": "tlpipe"},
        "remote": {"tlpipe": {"url": url, "endpointurl": store.endpoint_url, "region": store.region}},
    }
    with store.environ(), Repo(str(root), config=config) as repo:
        pushed = repo.push(remote="tlpipe")
    log.info("dvc push: %s objects to %s", pushed, url)


def _sign(
    store: StoreSession,
    manifest_key: str,
    signature_key: str,
    digests: dict[str, str],
    signer: Ed25519PrivateKey,
    out_dir: Path,
) -> None:
    """Sign the manifest as the store holds it, last: a release is complete once signed. A
    manifest left by an interrupted attempt is signed only if it lists exactly these files."""
    body = read_object(store.client, store.bucket, manifest_key)
    if body is None:
        raise StoreError(f"s3://{store.bucket}/{manifest_key} is gone; publish again")
    listed = {name: entry["sha256"] for name, entry in json.loads(body)["files"].items()}
    if listed != digests:
        raise StoreError(
            f"s3://{store.bucket}/{manifest_key} lists other files than this release; not signing it"
        )
    path = out_dir / SIGNATURE
    path.write_bytes(sign(body, signer))
    try:
        upload_file(store.client, path, store.bucket, signature_key, if_none_match=True)
    except AlreadyExists:
        log.info("publish: another publisher signed %s first", manifest_key)


def _put_once(store: StoreSession, path: Path, key: str, sha256: str) -> None:
    """Upload `path` to `key` unless the key holds this content already (left by an
    interrupted attempt at this same content-addressed version, or written by a concurrent
    one); StoreError when it holds other contents."""
    try:
        if not object_exists(store.client, store.bucket, key):
            meta = {"sha256": sha256}
            upload_file(store.client, path, store.bucket, key, if_none_match=True, metadata=meta)
            return
    except AlreadyExists:
        pass
    remote = store.client.head_object(Bucket=store.bucket, Key=key)
    if remote.get("Metadata", {}).get("sha256") != sha256:
        raise StoreError(f"s3://{store.bucket}/{key} exists with other contents")


def publish(
    params: Params,
    root: Path,
    prepare_dir: Path,
    validate_dir: Path,
    export_dir: Path,
    evaluate_dir: Path,
    out_dir: Path,
    store: StoreSession,
) -> PublishResult:
    """Gate, push the DVC cache, upload the release under a content-addressed version, move
    `candidate` to it, and `production` too when it passes the promotion gates.

    The champion check (tlpipe.gates, on `prepare_dir`'s test split) runs first: the model
    card (README.md) reports it. Files go up next, each with a conditional write that never
    overwrites; then manifest.json (SHA-256 of every file, git commit, dvc.lock output
    hashes, params, the lineage from the input data to the ONNX files); last its ed25519
    signature (tlpipe.signing), so a release without a signed manifest is incomplete and is
    never read as one. Publishing the same content again finds it signed and uploads
    nothing. Then `promote` (the serving check on export's serving.json).

    Writes `out_dir/release.json` and `out_dir/gates.json`. Raises GateFailed when a stage's
    gate file says the model is not fit to ship, StoreError when the store refuses a write,
    SignatureError when the signing key cannot be read. A version kept from production is
    not an error here: the result's `held` says why (the flow fails the run on it).
    """
    p = params.publish
    passed = check_gates(
        params.evaluate.min_gain,
        validate_dir / "report.json",
        evaluate_dir / "metrics.json",
        export_dir / "parity.json",
        params.export.max_abs_diff,
    )
    bundle = export_dir / "bundle"
    metrics = json.loads((evaluate_dir / "metrics.json").read_text())
    parity = json.loads((export_dir / "parity.json").read_text())

    files = {f.name: f for f in sorted(bundle.iterdir()) if f.is_file()}
    files["metrics.json"] = evaluate_dir / "metrics.json"
    files["parity.json"] = export_dir / "parity.json"
    digests = {name: sha256_file(path) for name, path in files.items()}
    version = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]
    prefix = release_prefix(p, version)
    uri = f"s3://{store.bucket}/{prefix}/"
    fresh_dir(out_dir)

    push_dvc_cache(root, store, p.dvc_remote_path)
    model = model_prefix(p)
    metric = primary_metric(spec(params.setting), params.evaluate.metric)
    test = read_split(prepare_dir, "test")
    champion = champion_check(store, model, version, bundle, test, metric, p.champion_tolerance)
    lineage = release_lineage(prepare_dir, export_dir)

    # The card is part of the release: one an earlier attempt at this version uploaded is
    # kept (it says how the version compared when first published).
    card = out_dir / "README.md"
    stored_card = read_object(store.client, store.bucket, f"{prefix}/README.md")
    if stored_card is not None:
        card.write_bytes(stored_card)
    else:
        card.write_text(model_card(params, metrics, parity, version, lineage, champion.gate))
    files["README.md"] = card
    digests["README.md"] = sha256_file(card)

    manifest_key = f"{prefix}/{MANIFEST}"
    signature_key = f"{prefix}/{SIGNATURE}"
    signer = signing_key()
    already = object_exists(store.client, store.bucket, manifest_key)
    if already:
        log.info("publish: %s has its manifest already; no file uploaded", uri)
    else:
        for name, path in files.items():
            _put_once(store, path, f"{prefix}/{name}", digests[name])
        manifest = {
            "name": p.model_name,
            "version": version,
            "created": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "files": {n: {"sha256": digests[n], "bytes": files[n].stat().st_size} for n in sorted(files)},
            "git": _git_commit(root),
            "dvc_lock": _lock_hashes(root / "dvc.lock"),
            "params": params.as_dict(),
            "setting": params.setting,
            "lineage": lineage,
            "metrics": {
                **{key: metrics["shipped"][key] for key in spec(params.setting).metrics},
                "gate": metrics["gate"],
            },
        }
        manifest_path = out_dir / MANIFEST
        write_json(manifest_path, manifest)
        try:
            upload_file(store.client, manifest_path, store.bucket, manifest_key, if_none_match=True)
        except AlreadyExists:
            # A publisher of this same content got there first; `_sign` checks its manifest.
            log.info("publish: another publisher wrote %s first", manifest_key)
    signed = object_exists(store.client, store.bucket, signature_key)
    if not signed:
        _sign(store, manifest_key, signature_key, digests, signer, out_dir)
    already = already and signed
    log.info("publish: %s %s", "already released:" if already else "released", uri)
    git = _git_commit(root)
    why = f"published from commit {git['commit'][:12]}" if git.get("commit") else "published"
    move_alias(store, model, CANDIDATE, version, why, signer)
    promotion = promote(params, store, model, version, passed, champion, export_dir, root, why, signer)
    aliases = (CANDIDATE, PRODUCTION) if promotion.after == version else (CANDIDATE,)
    result = PublishResult(
        version, uri, f"s3://{store.bucket}/{manifest_key}", already, aliases, promotion.held
    )
    write_json(out_dir / GATES, promotion.to_json(version, p.promote))
    write_json(
        out_dir / "release.json",
        {
            "version": version,
            "uri": uri,
            "manifest": result.manifest_uri,
            "files": sorted(digests),
            "aliases": list(aliases),
        },
    )
    if promotion.held:
        log.warning("publish: production stays on %s: %s", promotion.after, "; ".join(promotion.held))
    return result


@dataclass(frozen=True)
class Promotion:
    """The promotion gates' outcome: production before and after, and why it did not move
    to the version when a gate failed (`held`)."""

    gates: tuple[Gate, ...]
    before: str | None
    after: str | None
    held: tuple[str, ...]

    def to_json(self, version: str, enabled: bool) -> dict[str, Any]:
        return {
            "version": version,
            "promote": enabled,
            "production": {"before": self.before, "after": self.after, "moved": self.after != self.before},
            "passed": all(g.passed for g in self.gates),
            "gates": [g.to_json() for g in self.gates],
            "held": list(self.held),
        }


def promote(
    params: Params,
    store: StoreSession,
    model: str,
    version: str,
    stage_gates: tuple[Gate, ...],
    champion: Champion,
    export_dir: Path,
    root: Path,
    why: str,
    signer: Ed25519PrivateKey,
) -> Promotion:
    """Run the serving check on `version` and move `production` to it when that, the
    `champion` check and the `stage_gates` passed and `publish.promote` allows: with
    If-Match on the production model the champion check scored, so a production move made
    meanwhile by anyone else is never overwritten (the version is then held, saying so)."""
    p = params.publish
    serving = serving_check(store, model, CANDIDATE, version, export_dir / SERVING, root)
    gates = (*stage_gates, champion.gate, serving)
    before = champion.version
    failed = tuple(f"{g.name} gate: {g.detail}" for g in gates if not g.passed)
    if failed or not p.promote:
        return Promotion(gates, before, before, failed)
    condition: dict[str, Any] = {"expect": before} if before is not None else {"if_unset": True}
    try:
        moved = move_alias(store, model, PRODUCTION, version, f"passed its gates; {why}", signer, **condition)
    except RegistryError as err:
        current = read_alias(store, model, PRODUCTION)
        return Promotion(gates, before, current.version if current else None, (f"production: {err}",))
    if moved.version != version:
        return Promotion(gates, before, moved.version, (f"production was set to {moved.version} meanwhile",))
    return Promotion(gates, before, version, ())


def publish_to_store(
    params: Params,
    root: Path,
    prepare_dir: Path,
    validate_dir: Path,
    export_dir: Path,
    evaluate_dir: Path,
    out_dir: Path,
) -> PublishResult:
    """`publish` to the store `publish.bucket` names (TLPIPE_S3_ENDPOINT, or the embedded
    one, started for the duration of the call)."""
    with open_store(params.publish.bucket) as store:
        return publish(params, root, prepare_dir, validate_dir, export_dir, evaluate_dir, out_dir, store)


if __name__ == "__main__":
    from tasks.wiring import main

    main("publish")
