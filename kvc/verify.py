"""Prove a .kvc file intact (every checksum, every segment decodes) and, deeply, still faithful:
re-run the prefill the file records and compare with what each level decodes to."""

from __future__ import annotations

import torch

from kvc.errors import FormatError, KvcError, VerifyError
from kvc.runtime.kv import ContextKV


def _errors(reference: ContextKV, decoded: ContextKV) -> dict:
    max_abs, sq_err, sq_ref, exact = 0.0, 0.0, 0.0, True
    for a, b in zip(reference.layers, decoded.layers):
        for x, y in ((a.key, b.key), (a.value, b.value)):
            if x.shape != y.shape:
                return {"exact": False, "max_abs_error": float("inf"), "relative_rmse": float("inf")}
            exact = exact and torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
            diff = x.double() - y.double()
            max_abs = max(max_abs, diff.abs().max().item() if diff.numel() else 0.0)
            sq_err += diff.pow(2).sum().item()
            sq_ref += x.double().pow(2).sum().item()
    return {"exact": exact, "max_abs_error": max_abs, "relative_rmse": (sq_err / sq_ref) ** 0.5 if sq_ref else 0.0}


def _elements_outside_bound(codec, reference: ContextKV, decoded: ContextKV, slack: float = 0.0) -> int:
    """Elements of ``decoded`` farther from ``reference`` than the codec's bound allows. ``slack`` (relative)
    widens it where the reference prefill ran other arithmetic than the file's (a padded batch, other
    kernels): the file was quantised from a cache a few ulps away, so an element's error can exceed the
    bound by that much (a sink token's float16 rounding, say, lands on the other side)."""
    outside = 0
    for i, (a, b) in enumerate(zip(reference.layers, decoded.layers)):
        for kind, x, y in (("key", a.key, b.key), ("value", a.value, b.value)):
            if x.numel():
                limit = codec.element_error_bound(i, kind, x, a.start).double()
                if slack:
                    xd = x.double()
                    limit = limit + slack * (xd.abs() + xd.pow(2).mean().sqrt())
                outside += int(((y.double() - x.double()).abs() > limit).sum().item())
    return outside


def _reencoding_differs(f, level: str, reference: ContextKV, decoded: ContextKV) -> int:
    """Segments whose stored decode differs from what the codec makes of the fresh prefill (encode, then
    decode), bit for bit. In the environment that wrote the file a faithful lossy level reproduces
    exactly, so this catches a forged payload that stays inside the codec's error bounds."""
    from kvc.codec.base import Segment

    codec = f._codec(level)
    if hasattr(codec, "bind_tokens"):  # a level with fine tokens re-encodes with the file's own token ids
        codec.bind_tokens(f.token_ids)
    # a chained (version-5) level predicts each layer from the one before: this check's encode and its decode
    # each keep their own reconstructions (layers in order within each chunk), never the codec
    chains = (codec.new_chain(), codec.new_chain()) if hasattr(codec, "new_chain") else (None, None)
    enc_extra, dec_extra = ({"chain": c} if c is not None else {} for c in chains)
    differing = 0
    for chunk in f.header["chunks"]:
        for i, (ref, got) in enumerate(zip(reference.layers, decoded.layers)):
            lo, hi = max(chunk["start"], ref.start), chunk["end"]
            if hi <= lo:
                continue
            for kind, x, y in (("key", ref.key, got.key), ("value", ref.value, got.value)):
                piece = x[:, lo - ref.start : hi - ref.start].contiguous()
                stored = y[:, lo - got.start : hi - got.start].contiguous()
                seg = Segment(layer=i, kind=kind, start=lo, shape=tuple(piece.shape), dtype=f.dtype)
                again = codec.decode(codec.encode(piece, seg, **enc_extra), seg, **dec_extra)
                if again.shape != stored.shape or not torch.equal(again.view(torch.uint8), stored.view(torch.uint8)):
                    differing += 1
    return differing


def lossless_tolerance(dtype: torch.dtype) -> float:
    """The relative RMSE a lossless level may show against a prefill run by other kernels: one unit
    of the dtype's precision (bf16 7.8e-3, fp16 9.8e-4), never below 1e-4 (float32). Measured in bf16
    over a tiny Llama's cache: AMX against AVX-512 or AVX2 kernels on one CPU 2e-4 to 4e-4, one
    nondeterministic attention run against another 1.3e-3."""
    return max(1e-4, torch.finfo(dtype).eps)


def _same_environment(recorded: dict, lm) -> tuple[bool, str]:
    """Whether this prefill runs the arithmetic that made the file, and if not, why not. Files from
    before the kernel fingerprint was recorded are judged by device and torch version alone."""
    from kvc.runtime.kernels import kernel_fingerprint

    if recorded.get("device") != lm.device.type:
        return False, "different device"
    if recorded.get("torch") != torch.__version__.split("+")[0]:
        return False, "different torch"
    if lm.device.type == "cpu" and lm.dtype in (torch.bfloat16, torch.float16):
        # torch's 16-bit attention on CPU (the oneDNN brgemm flash kernel) is not deterministic: the same
        # process gave other bytes in 1 prefill of 40, fresh processes in 2 of 10 (max 1 bf16 ulp). It is
        # checked before the fingerprint, whose own attention probe can flake the same way.
        return False, "16-bit attention on CPU is not deterministic"
    if "batch" in recorded:
        return False, "prefilled in a padded batch"
    if "kernels" in recorded and recorded["kernels"] != kernel_fingerprint(lm.dtype, lm.device):
        return False, "different kernels (CPU features, thread count or dtype)"
    return True, ""


def verify(f, deep: bool = False, lm=None) -> dict:
    """A report dict; ``ok`` is False when anything failed. Raises only for unusable input."""
    report = {
        "file": f.name,
        "format_version": "{}.{}".format(*f.version),
        "tokens": f.num_tokens,
        "checks": [],
        "levels": {},
        "ok": True,
    }

    def check(name: str, passed: bool, detail: str = "", exit_code: int | None = None) -> None:
        entry = {"check": name, "ok": passed, "detail": detail}
        if not passed:  # what the failure means, as the CLI's exit code: 3 corrupt, 6 unfaithful, 7 no profile
            entry["exit_code"] = exit_code or FormatError.exit_code
        report["checks"].append(entry)
        report["ok"] = report["ok"] and passed

    check("header", True, "magic, version, header checksum and structure")
    decoded = {}
    for level in f.levels:
        try:
            payloads = f.check_payloads(level)
            decoded[level] = f.read(level)
            check(f"level {level}", True, f"{payloads} chunk payloads match every checksum, every segment decodes")
        except KvcError as exc:  # a corrupt chunk (3), or a profile that is missing or wrong (7)
            check(f"level {level}", False, str(exc), exc.exit_code)
    if not deep or not report["ok"]:
        return report
    from kvc.defaults import DEFAULT_SLICE_TOKENS
    from kvc.runtime.prefill import prefill

    f.check_model(lm)
    check("model", True, f"{lm.name}: config, weights and tokenizer fingerprints match")
    recorded = f.header.get("prefill", {})
    reference = prefill(lm, f.token_ids, recorded.get("slice_tokens", DEFAULT_SLICE_TOKENS))
    same_env, why = _same_environment(recorded, lm)
    report["same_environment"] = same_env
    if not same_env:
        report["environment_differs"] = why
    from kvc.codec.registry import LOSSLESS, build_codec

    # The file's layout and dtype must be what the model computes, before any element is compared.
    stored = [(s["start"], s["kv_heads"], s["key_dim"], s["value_dim"]) for s in f.header["layout"]["layers"]]
    fresh = [(r.start, r.key.shape[0], r.key.shape[2], r.value.shape[2]) for r in reference.layers]
    model_dtype = str(reference.layers[0].key.dtype).removeprefix("torch.") if reference.layers else "?"
    if stored != fresh or model_dtype != f.header["dtype"]:
        check(
            "deep layout",
            False,
            f"the file's layers (heads, dims, windows) or dtype are not what the model computes: "
            f"{len(stored)} layers of {f.header['dtype']} stored, {len(fresh)} layers of {model_dtype} computed",
        )
        return report
    for level, kv in decoded.items():
        err = _errors(reference, kv)
        entry = f.header["levels"][level]
        if entry["codec"] == LOSSLESS:
            # Lossless promises the exact bytes of the prefill that made the file; other kernels round
            # differently, so there it is held to float tolerance only.
            # (the cache has layers here: one without any fails the layout check above)
            tolerance = lossless_tolerance(reference.layers[0].key.dtype)
            passed = err["exact"] or (not same_env and err["relative_rmse"] < tolerance)
            bound = "exact" if same_env else f"relative RMSE < {tolerance:.3g} ({why})"
        else:
            codec = build_codec(entry, f._profile_for(entry))
            limit = getattr(codec, "relative_rmse_bound", None)
            passed = limit is None or err["relative_rmse"] <= limit
            bound = f"relative RMSE ≤ {limit:.3g}" if limit is not None else "no stated bound"
            if hasattr(codec, "element_error_bound"):
                # The strict bound: every element within what the quantiser can have moved it.
                slack = 0.0 if same_env else lossless_tolerance(reference.layers[0].key.dtype)
                outside = _elements_outside_bound(codec, reference, kv, slack)
                err["elements_outside_bound"] = outside
                passed = passed and outside == 0
                within = "its quantiser bound" + ("" if same_env else f" (+{slack:.3g} relative: {why})")
                bound += (f"; every element within {within}" if outside == 0
                          else f"; {outside} elements outside {within}")
            if same_env:
                # Where the file was written, re-encoding the fresh prefill reproduces the level exactly.
                differing = _reencoding_differs(f, level, reference, kv)
                err["segments_not_reproduced"] = differing
                passed = passed and differing == 0
                bound += f"; re-encoding the prefill reproduces every segment ({differing} differ)"
        report["levels"][level] = {**err, "bound": bound, "ok": passed}
        check(
            f"deep {level}",
            passed,
            f"max |error| {err['max_abs_error']:.3g}, relative RMSE {err['relative_rmse']:.3g} ({bound})",
            VerifyError.exit_code,
        )
    return report
