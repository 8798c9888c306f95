"""The method: joint clustering into objects, the centroid memory bank, cycle-consistent cross-image
neighbours and the CrIBo loss."""
