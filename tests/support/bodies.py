"""Hypothesis strategies for request bodies that are odd, malformed or nearly valid: the fuzz
test sends them to the running worker, the document tests check that the request validator and
the published schemas agree on them."""

from __future__ import annotations

import string

from hypothesis import strategies as st

MODIFIER_KEYS = ["prompt", "negative_prompt", "width", "height", "steps", "seed", "cfg",
                 "cfg_scale", "sampler_name", "scheduler", "denoise", "ckpt_name", "batch_size",
                 "filename_prefix", "image", "w"]

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | st.text(max_size=40))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=10), inner, max_size=4), max_leaves=20)
odd_values = json_values | st.sampled_from(
    ["Text2Image", "RawWorkflow", "Image2Image", "", " ", "__RANDOM_INT__", -1, 0, 2**64,
     -(2**63), 1e308, [], {}, "../../etc/passwd", "\x00", "data:image/png;base64,AAAA",
     "http://127.0.0.1:1/x.png", "ftp://x", "\u202e\ufeff"])
small_ints = st.integers(min_value=-8, max_value=160)
graphs = st.dictionaries(
    st.text(max_size=4) | st.sampled_from(["1", "2", "9"]),
    st.fixed_dictionaries(
        {"class_type": st.sampled_from(["EmptyImage", "SaveImage", "KSampler", "LoadImage",
                                        "ImageInvert", "NoSuchNode", ""]) | odd_values},
        optional={"inputs": st.dictionaries(
            st.sampled_from(["width", "height", "batch_size", "color", "images",
                             "filename_prefix", "image", "seed"]) | st.text(max_size=6),
            small_ints | st.just(["1", 0]) | odd_values, max_size=5) | odd_values})
    | odd_values, max_size=4)
modifications = st.dictionaries(st.sampled_from(MODIFIER_KEYS) | st.text(max_size=8),
                                small_ints | odd_values, max_size=6)
blocks = {
    "s3": st.dictionaries(st.sampled_from(["access_key_id", "secret_access_key",
                                           "endpoint_url", "bucket_name", "region", "x"]),
                          st.text(max_size=30) | odd_values, max_size=6),
    "webhook": st.dictionaries(st.sampled_from(["url", "extra_params", "secret", "timeout", "y"]),
                               st.sampled_from(["http://127.0.0.1:1/", "https://no.invalid/",
                                                "not a url", "file:///etc/passwd"])
                               | odd_values, max_size=4),
}
inputs = st.fixed_dictionaries({}, optional={
    "request_id": st.text(alphabet=string.ascii_letters + string.digits + "-_.", max_size=140)
    | odd_values,
    "modifier": st.sampled_from(["Text2Image", "RawWorkflow", "Image2Image"]) | odd_values,
    "modifications": modifications | odd_values,
    "workflow_json": graphs | odd_values,
    "s3": blocks["s3"] | odd_values,
    "webhook": blocks["webhook"] | odd_values,
    "return_outputs_as_base64": st.booleans() | odd_values,
    "handler": odd_values,
})
# Nearly valid requests, so that the fuzzing also reaches ComfyUI's own validation and runs.
nearly_valid = st.one_of(
    st.builds(lambda g, b: {"input": {"workflow_json": g, "return_outputs_as_base64": b}},
              graphs, st.booleans()),
    st.builds(lambda m, name: {"input": {"modifier": name, "modifications": m}}, modifications,
              st.sampled_from(["Text2Image", "RawWorkflow", "Image2Image"])),
)
documents = st.one_of(
    nearly_valid,
    json_values,
    st.builds(lambda i: {"input": i}, inputs),
    st.builds(lambda v: {"input": v}, odd_values),
    st.builds(lambda a, i: {"auth_data": a, "payload": {"input": i}}, json_values, inputs),
    st.builds(lambda p: {"payload": p}, odd_values),
)

