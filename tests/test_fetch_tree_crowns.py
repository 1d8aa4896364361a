"""NEON tree-crown tiling: tiles cover the crop edge to edge; crowns are clipped to and kept by tiles."""

from PIL import Image

from pvt_dist.detection.fetch_tree_crowns import tile_origins, tile_split, voc_boxes
from pvt_dist.detection.targets import validate_coco_dataset

VOC = """<annotation><object><name>Tree</name><bndbox><xmin>10</xmin><ymin>20</ymin><xmax>50</xmax>
<ymax>60</ymax></bndbox></object><object><name>Tree</name><bndbox><xmin>380</xmin><ymin>100</ymin>
<xmax>440</xmax><ymax>140</ymax></bndbox></object></annotation>"""


def test_tile_origins_cover_the_image_edge_to_edge():
    assert tile_origins(400) == [0]
    assert tile_origins(1035) == [0, 318, 635]  # 3 tiles, the last one ending at 1035
    assert tile_origins(1249) == [0, 283, 566, 849]


def test_crowns_are_clipped_and_kept_where_at_least_half_lies(tmp_path):
    boxes = voc_boxes(VOC, "test.xml")
    assert boxes == [(10.0, 20.0, 50.0, 60.0), (380.0, 100.0, 440.0, 140.0)]
    (tmp_path / "train").mkdir()
    d = tile_split(Image.new("RGB", (700, 400)), boxes, "crop", tmp_path, "train")
    by_tile = {img["file_name"]: img["id"] for img in d["images"]}
    assert sorted(by_tile) == ["crop_0000_0000.jpg", "crop_0300_0000.jpg"]
    anns = {(a["image_id"], tuple(a["bbox"])) for a in d["annotations"]}
    first, second = by_tile["crop_0000_0000.jpg"], by_tile["crop_0300_0000.jpg"]
    # The crown straddling x=400 has 20 of its 60 px in tile 0 (dropped there) and all of it in tile 1.
    assert anns == {(first, (10.0, 20.0, 40.0, 40.0)), (second, (80.0, 100.0, 60.0, 40.0))}
    validate_coco_dataset(d, source="tiles", image_root=tmp_path / "train")
