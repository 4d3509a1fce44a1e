"""An ipywidgets explorer of predictions: pick a region and an image, see its top-k and a map."""

from __future__ import annotations

import os
from pathlib import Path

import geopandas as gpd
import ipywidgets as widgets
import pandas as pd
from IPython.display import display
from matplotlib.figure import Figure

from lageo_utils.images import ImageReadError, open_rgb

MAP_CRS = "EPSG:3310"  # California Albers: metres, so distances look right


class PredictionExplorer:
    """Widgets over a predictions table; ``.widget`` is what a notebook displays."""

    def __init__(self, predictions: pd.DataFrame, regions: gpd.GeoDataFrame, image_root: str | os.PathLike):
        self.predictions = predictions.reset_index(drop=True)
        self.regions = regions
        self.image_root = Path(image_root)
        self.names = dict(zip(regions["id"], regions["name"]))
        present = [rid for rid in regions["id"] if (self.predictions["true_region"] == rid).any()]
        self.region_picker = widgets.Dropdown(options=[(self.names[r], r) for r in present], description="Region")
        self.image_picker = widgets.Dropdown(description="Image", layout=widgets.Layout(width="60%"))
        self.output = widgets.Output()
        self.region_picker.observe(self._on_region, names="value")
        self.image_picker.observe(self._on_image, names="value")
        self.widget = widgets.VBox([widgets.HBox([self.region_picker, self.image_picker]), self.output])
        self._on_region()

    def _on_region(self, _change=None) -> None:
        rows = self.predictions.index[self.predictions["true_region"] == self.region_picker.value]
        self.image_picker.options = [(self.predictions.at[i, "image_path"], int(i)) for i in rows]
        self.image_picker.value = int(rows[0]) if len(rows) else None

    def _on_image(self, _change=None) -> None:
        self.output.clear_output(wait=True)
        if self.image_picker.value is None:
            return
        with self.output:
            display(self.figure(self.image_picker.value))

    def figure(self, row: int):
        """The image, its top-k probabilities and a map of the true point and predicted centroids."""
        pred = self.predictions.loc[row]
        fig = Figure(figsize=(15, 4.5))  # outside pyplot: nothing left open for the notebook to show twice
        ax_img, ax_bar, ax_map = fig.subplots(1, 3, width_ratios=[1, 1.1, 1.3])
        try:
            ax_img.imshow(open_rgb(self.image_root / pred["image_path"]))
        except ImageReadError as exc:
            ax_img.text(0.5, 0.5, f"unreadable:\n{exc.reason}", ha="center", va="center", wrap=True)
        ax_img.set_title(f"true: {self.names[pred['true_region']]}")
        ax_img.axis("off")

        top = list(pred["top_regions"])
        probs = list(pred["top_probs"])
        colours = ["tab:green" if r == pred["true_region"] else "tab:grey" for r in top]
        ax_bar.barh([self.names[r] for r in top][::-1], probs[::-1], color=colours[::-1])
        ax_bar.set_xlim(0, 1)
        ax_bar.set_xlabel("probability")
        ax_bar.set_title(f"top-{len(top)} (error {pred['error_km']:.1f} km)")

        boxes = self.regions.to_crs(MAP_CRS)
        boxes.boundary.plot(ax=ax_map, color="lightgrey", linewidth=0.8)
        lookup = self.regions.set_index("id")
        centroids = gpd.GeoDataFrame(
            {"prob": probs},
            geometry=gpd.points_from_xy(lookup.loc[top, "centroid_lon"], lookup.loc[top, "centroid_lat"]),
            crs="EPSG:4326",
        ).to_crs(MAP_CRS)
        centroids.plot(ax=ax_map, markersize=30 + 400 * centroids["prob"], color="tab:orange", alpha=0.7,
                       label="predicted centroids (size = probability)")
        truth = gpd.GeoSeries(gpd.points_from_xy([pred["longitude"]], [pred["latitude"]]), crs="EPSG:4326")
        truth.to_crs(MAP_CRS).plot(ax=ax_map, marker="*", markersize=250, color="tab:red", label="true location")
        ax_map.legend(loc="lower left", fontsize=8)
        ax_map.set_axis_off()
        ax_map.set_title("map (EPSG:3310)")
        fig.tight_layout()
        return fig
