"""Entry point of the ``evolsplat-multiscene`` dataparser.

nerfstudio loads dataparser entry points while ``nerfstudio.data.datamanagers.base_datamanager`` is still being
imported, so this module may import only dataparser-level nerfstudio modules (never datamanagers, pipelines or
the trainer) — otherwise every ``ns-*`` command fails with a circular import.
"""

from nerfstudio.plugins.registry_dataparser import DataParserSpecification

from evolsplat_ns.data.ns_dataparser import EvolSplatDataParserConfig

evolsplat_multiscene = DataParserSpecification(
    config=EvolSplatDataParserConfig(),
    description="Folder of driving scenes for evolsplat-ff: multi-scene root of transforms.json scenes, or (layout option) "
    "the reference's KITTI-360/Waymo scenes, DriveStudio scenes, raw PandaSet, raw KITTI",
)
