"""Reading checkpoints of every supported layout (ours, released CrIBo / DINO / iBOT / CrOC / VICRegL) and
telling their architecture."""
