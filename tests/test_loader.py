"""ComfyUI's own custom-node loader imports the pack and serves its nodes."""

EXPECTED_NODES = {"MasaCtrlAttentionPatch", "MasaCtrlConditioningBatch", "MasaCtrlLatentBatch"}


def test_pack_imports_without_error(comfy_server):
    lines = [line for line in comfy_server.log().splitlines() if "comfyui-consistent-synthesis" in line]
    # "Import times for custom nodes": one line per pack, marked (IMPORT FAILED) when it failed
    assert any("seconds" in line for line in lines), comfy_server.log()
    assert not any("IMPORT FAILED" in line or "Error" in line for line in lines), lines


def test_object_info_lists_the_nodes_with_tooltips_on_every_input(comfy_server):
    info = comfy_server.get("/object_info")
    assert EXPECTED_NODES <= set(info)
    for name in EXPECTED_NODES:
        node = info[name]
        assert node["category"].startswith("consistent synthesis")
        for group in ("required", "optional"):
            for input_name, spec in node["input"].get(group, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_masactrl_defaults_are_the_papers(comfy_server):
    required = comfy_server.get("/object_info/MasaCtrlAttentionPatch")["MasaCtrlAttentionPatch"]["input"]["required"]
    assert required["start_step"][1]["default"] == 4
    assert required["start_layer"][1]["default"] == 10
    assert required["mode"][1]["options"] == ["mutual", "union"] or required["mode"][0] == ["mutual", "union"]


def test_a_bad_value_gets_a_validation_error_naming_node_and_input(comfy_server):
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "MasaCtrlLatentBatch",
              "inputs": {"source": ["1", 0], "targets": 0, "source_is_reference": False, "share_noise": True}},
        "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "x"}},
    }
    status, body = comfy_server.post("/prompt", {"prompt": prompt})
    assert status == 400
    errors = body["node_errors"]["2"]
    assert errors["class_type"] == "MasaCtrlLatentBatch"
    assert any(e["extra_info"]["input_name"] == "targets" for e in errors["errors"]), errors
