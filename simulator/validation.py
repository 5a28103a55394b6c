"""Prompt validation with ComfyUI's error types, messages, details and ``extra_info``.

This follows ComfyUI 0.3.64's ``validate_prompt`` / ``validate_inputs`` step by step, because
clients (and the worker) key on the exact shapes: which node ids appear in ``node_errors``, how
a bad link is reported, which values are converted before the prompt is queued.

Two deliberate differences: inputs are checked in the node's declaration order and output nodes
in prompt order (ComfyUI iterates Python sets, so its order varies from run to run).
"""

from __future__ import annotations

import logging
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

from simulator.nodes import NODE_CLASSES, NodeEnv, SimNode

logger = logging.getLogger(__name__)

NodeResult = tuple[bool, list[dict[str, Any]], str]


@dataclass
class ValidationResult:
    ok: bool
    error: dict[str, Any] | None
    good_outputs: list[str]
    node_errors: dict[str, Any] = field(default_factory=dict)


def full_type_name(kind: type) -> str:
    module = kind.__module__
    if module == "builtins":
        return kind.__qualname__
    return f"{module}.{kind.__qualname__}"


def is_link(value: Any) -> bool:
    """A ``[node_id, slot]`` reference, as ComfyUI recognises one at execution time."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int))


def input_info(class_inputs: dict[str, Any], name: str) -> tuple[Any, str | None, dict[str, Any] | None]:
    """(type, category, options) of one input, or (None, None, None) when it is not declared."""
    for category in ("required", "optional", "hidden"):
        group = class_inputs.get(category)
        if group and name in group:
            spec = group[name]
            if isinstance(spec, str):  # hidden inputs are declared by a bare type string
                return spec, category, {}
            return spec[0], category, (spec[1] if len(spec) > 1 else {})
    return None, None, None


def types_compatible(received: Any, wanted: Any) -> bool:
    """ComfyUI's ``validate_node_input`` (non-strict): equal, or comma-lists that overlap."""
    if not received != wanted:
        return True
    if not isinstance(received, str) or not isinstance(wanted, str):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in wanted.split(",")})


class PromptValidator:
    """Validates one prompt against the simulated node classes."""

    def __init__(self, env: NodeEnv, classes: dict[str, type[SimNode]] | None = None) -> None:
        self.env = env
        self.classes = classes if classes is not None else NODE_CLASSES

    def validate_prompt(self, prompt: Any, partial_targets: list[str] | None = None) -> ValidationResult:
        """Validate, converting widget values in place (ComfyUI queues the converted prompt).

        Malformed input that ComfyUI does not guard against (a prompt that is a number, a node
        that is not an object) raises here too; the HTTP layer turns that into a 500.
        """
        outputs: list[str] = []
        newer = self.env.api_version.is_newer
        for node_id in prompt:
            node = prompt[node_id]
            if "class_type" not in node:
                if newer:
                    return ValidationResult(False, _missing_node_type(node_id, node, None), [])
                return ValidationResult(False, _prompt_error(
                    "invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'"), [])
            class_type = node["class_type"]
            cls = self.classes.get(class_type)  # an unhashable class_type raises: a 500, as in ComfyUI
            if cls is None:
                if newer:
                    return ValidationResult(False, _missing_node_type(node_id, node, class_type), [])
                return ValidationResult(False, _prompt_error(
                    "invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                    f"Node ID '#{node_id}'"), [])
            if cls.OUTPUT_NODE and (partial_targets is None or node_id in partial_targets):
                if node_id not in outputs:
                    outputs.append(node_id)

        if not outputs:
            return ValidationResult(False, _prompt_error("prompt_no_outputs", "Prompt has no outputs", ""), [])

        good_outputs: list[str] = []
        failures: list[tuple[str, list[dict[str, Any]]]] = []
        node_errors: dict[str, Any] = {}
        validated: dict[str, NodeResult] = {}
        for output_id in outputs:
            try:
                valid, reasons, _ = self._validate_inputs(prompt, output_id, validated)
            except Exception as ex:  # ComfyUI reports any crash inside validation this way
                valid = False
                reasons = [{
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": str(ex),
                    "extra_info": {"exception_type": full_type_name(type(ex)),
                                   "traceback": traceback.format_tb(sys.exc_info()[2])},
                }]
                validated[output_id] = (False, reasons, output_id)

            if valid is True:
                good_outputs.append(output_id)
                continue
            logger.error("Failed to validate prompt for output %s:", output_id)
            if reasons:
                logger.error("* (prompt):")
                for reason in reasons:
                    logger.error("  - %s: %s", reason["message"], reason["details"])
            failures.append((output_id, reasons))
            # As in ComfyUI, every node that has errors so far is charged to this output; nodes
            # that are only invalid because something upstream is are not listed.
            for node_id, (node_valid, node_reasons, _) in validated.items():
                if node_valid is not True and node_reasons:
                    if node_id not in node_errors:
                        class_type = prompt[node_id]["class_type"]
                        node_errors[node_id] = {"errors": node_reasons, "dependent_outputs": [],
                                                "class_type": class_type}
                        logger.error("* %s %s:", class_type, node_id)
                        for reason in node_reasons:
                            logger.error("  - %s: %s", reason["message"], reason["details"])
                    node_errors[node_id]["dependent_outputs"].append(output_id)
            logger.error("Output will be ignored")

        if not good_outputs:
            details = "\n".join(f"{e['message']}: {e['details']}" for _, errors in failures for e in errors)
            return ValidationResult(False, _prompt_error(
                "prompt_outputs_failed_validation", "Prompt outputs failed validation", details),
                [], node_errors)
        return ValidationResult(True, None, good_outputs, node_errors)

    def _validate_inputs(self, prompt: dict[str, Any], unique_id: str,
                         validated: dict[str, NodeResult]) -> NodeResult:
        if unique_id in validated:
            return validated[unique_id]
        inputs = prompt[unique_id]["inputs"]
        class_type = prompt[unique_id]["class_type"]
        cls = self.classes[class_type]
        class_inputs = cls.input_types(self.env)
        declared = list(class_inputs.get("required", {})) + [
            name for name in class_inputs.get("optional", {}) if name not in class_inputs.get("required", {})]

        errors: list[dict[str, Any]] = []
        valid = True
        for name in declared:
            input_type, category, extra = input_info(class_inputs, name)
            assert extra is not None
            if name not in inputs:
                if category == "required":
                    errors.append({"type": "required_input_missing", "message": "Required input is missing",
                                   "details": f"{name}", "extra_info": {"input_name": name}})
                continue

            val = inputs[name]
            info = (input_type, extra)
            if isinstance(val, list):
                error, upstream_ok = self._check_link(prompt, name, val, info, input_type, validated)
                if error is not None:
                    errors.append(error)
                if not upstream_ok:
                    valid = False
                continue

            try:
                # A dict with "__value__" carries a list-valued widget (a bare list is a link).
                if isinstance(val, dict) and "__value__" in val:
                    val = val["__value__"]
                    inputs[name] = val
                if input_type == "INT":
                    val = int(val)
                    inputs[name] = val
                if input_type == "FLOAT":
                    val = float(val)
                    inputs[name] = val
                if input_type == "STRING":
                    val = str(val)
                    inputs[name] = val
                if input_type == "BOOLEAN":
                    val = bool(val)
                    inputs[name] = val
            except Exception as ex:
                errors.append({
                    "type": "invalid_input_type",
                    "message": f"Failed to convert an input value to a {input_type} value",
                    "details": f"{name}, {val}, {ex}",
                    "extra_info": {"input_name": name, "input_config": info, "received_value": val,
                                   "exception_message": str(ex)},
                })
                continue

            if name in cls.VALIDATE_ARGS:
                continue
            if "min" in extra and val < extra["min"]:
                errors.append({
                    "type": "value_smaller_than_min",
                    "message": "Value {} smaller than min of {}".format(val, extra["min"]),
                    "details": f"{name}",
                    "extra_info": {"input_name": name, "input_config": info, "received_value": val},
                })
                continue
            if "max" in extra and val > extra["max"]:
                errors.append({
                    "type": "value_bigger_than_max",
                    "message": "Value {} bigger than max of {}".format(val, extra["max"]),
                    "details": f"{name}",
                    "extra_info": {"input_name": name, "input_config": info, "received_value": val},
                })
                continue
            if isinstance(input_type, list) and val not in input_type:
                # ComfyUI leaves long lists (e.g. many model files) out of the reply.
                if len(input_type) > 20:
                    list_info, input_config = f"(list of length {len(input_type)})", None
                else:
                    list_info, input_config = str(input_type), info
                errors.append({
                    "type": "value_not_in_list",
                    "message": "Value not in list",
                    # The newest ComfyUI shows the value's repr (the same for a string).
                    "details": (f"{name}: {val!r} not in {list_info}" if self.env.api_version.is_newer
                                else f"{name}: '{val}' not in {list_info}"),
                    "extra_info": {"input_name": name, "input_config": input_config, "received_value": val},
                })
                continue

        if cls.VALIDATE_ARGS:
            errors.extend(self._custom_validation(cls, inputs))

        result: NodeResult = (False, errors, unique_id) if errors or valid is not True else (True, [], unique_id)
        validated[unique_id] = result
        return result

    def _check_link(self, prompt: dict[str, Any], name: str, val: list[Any], info: tuple[Any, Any],
                    input_type: Any, validated: dict[str, NodeResult]) -> tuple[dict[str, Any] | None, bool]:
        """(error for this input or None, whether the upstream node validated)."""
        if len(val) != 2:
            return {"type": "bad_linked_input",
                    "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    "details": f"{name}",
                    "extra_info": {"input_name": name, "input_config": info, "received_value": val}}, True
        # A link to a missing node or slot raises here, uncaught, exactly as in ComfyUI: the
        # caller reports it as exception_during_(inner_)validation.
        upstream_id = val[0]
        upstream_class = prompt[upstream_id]["class_type"]
        received_type = self.classes[upstream_class].RETURN_TYPES[val[1]]
        if not types_compatible(received_type, input_type):
            return {"type": "return_type_mismatch",
                    "message": "Return type mismatch between linked nodes",
                    "details": f"{name}, received_type({received_type}) mismatch input_type({input_type})",
                    "extra_info": {"input_name": name, "input_config": info, "received_type": received_type,
                                   "linked_node": val}}, True
        try:
            upstream = self._validate_inputs(prompt, upstream_id, validated)
        except Exception as ex:
            validated[upstream_id] = (False, [{
                "type": "exception_during_inner_validation",
                "message": "Exception when validating inner node",
                "details": str(ex),
                "extra_info": {"input_name": name, "input_config": info, "exception_message": str(ex),
                               "exception_type": full_type_name(type(ex)),
                               "traceback": traceback.format_tb(sys.exc_info()[2]), "linked_node": val},
            }], upstream_id)
            return None, False
        return None, upstream[0] is not False

    def _custom_validation(self, cls: type[SimNode], inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """A node's VALIDATE_INPUTS: called with its own constant inputs (links count as None)."""
        args = {}
        for name in cls.VALIDATE_ARGS:
            if name in inputs:
                args[name] = None if isinstance(inputs[name], list) else inputs[name]
        outcome = cls.validate(self.env, **args)
        if outcome is True:
            return []
        errors = []
        for name in args:
            details = f"{name}"
            if outcome is not False:
                details += f" - {outcome}"
            errors.append({"type": "custom_validation_failed", "message": "Custom validation failed for node",
                           "details": details, "extra_info": {"input_name": name}})
        return errors


def _missing_node_type(node_id: str, node: dict[str, Any], class_type: Any) -> dict[str, Any]:
    """The newest ComfyUI's error for an unknown ``class_type`` (or none at all)."""
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, dict) else None
    if class_type is None:
        message = (f"Node '{title or f'ID #{node_id}'}' has no class_type. The workflow may be corrupted or a "
                   "custom node is missing.")
    else:
        title = title if title is not None else class_type
        message = f"Node '{title}' not found. The custom node may not be installed."
    return {"type": "missing_node_type", "message": message, "details": f"Node ID '#{node_id}'",
            "extra_info": {"node_id": node_id, "class_type": class_type, "node_title": title}}


def _prompt_error(kind: str, message: str, details: str) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}
