"""An ipywidgets explorer of predictions: pick a model, a region and an image; see its top-k and a map."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import geopandas as gpd
import ipywidgets as widgets
import pandas as pd
from matplotlib.figure import Figure

from lageo_utils.images import ImageReadError, open_rgb
from lageo_utils.maps import MAP_CRS
from lageo_utils.notebook import figure_png


class PredictionExplorer:
    """Model, Region and Image dropdowns over predictions tables; ``.widget`` is what a notebook displays.

    ``predictions`` maps a model name (e.g. ``"zeroshot"``, ``"finetuned"``) to its predictions table;
    ``labels`` gives the names the Model dropdown shows. Changing any control redraws the picture;
    switching models keeps the region and image where the other table has them, so the same image
    can be compared across models. The controls that choose a table are ``table_pickers``; another
    one (e.g. a coordinate Method) is added there and joins the key in ``table``.
    """

    def __init__(self, predictions: Mapping[str, pd.DataFrame], regions: gpd.GeoDataFrame,
                 image_root: str | os.PathLike, labels: Mapping[str, str] | None = None,
                 coordinates: Mapping[str, pd.DataFrame] | None = None):
        if not predictions:
            raise ValueError("PredictionExplorer needs at least one predictions table")
        self.predictions = {name: table.reset_index(drop=True) for name, table in predictions.items()}
        self.labels = {name: (labels or {}).get(name, name) for name in self.predictions}
        self.regions = regions
        self.image_root = Path(image_root)
        self.names = dict(zip(regions["id"], regions["name"]))
        self.model_picker = widgets.Dropdown(options=[(self.labels[m], m) for m in self.predictions],
                                             description="Model")
        self.region_picker = widgets.Dropdown(description="Region")
        self.image_picker = widgets.Dropdown(description="Image", layout=widgets.Layout(width="50%"))
        # Coordinate answers per model (steps 02/03): a Method control chooses the answer the map shows.
        self.coordinates = {name: table[~table["voted"]] for name, table in (coordinates or {}).items()}
        methods = sorted({m for table in self.coordinates.values() for m in table["method"]} - {"centroid"})
        self.method_picker = widgets.Dropdown(options=["centroid", *methods], value="centroid", description="Method")
        self.table_pickers = [self.model_picker, *([self.method_picker] if methods else [])]
        self.controls = [*self.table_pickers, self.region_picker, self.image_picker]
        self.output = widgets.Output()
        self.shown: Figure | None = None  # the figure on display
        self._updating = False
        self._refresh_choices()
        for control in self.controls:
            control.observe(self._on_change, names="value")
        self.widget = widgets.VBox([widgets.HBox(self.controls), self.output])
        self.redraw()

    def table(self) -> pd.DataFrame:
        """The predictions table the table pickers select."""
        return self.predictions[self.model_picker.value]

    def _on_change(self, change: dict) -> None:
        if self._updating:  # options being refreshed: draw once, afterwards
            return
        if change["owner"] is not self.image_picker:
            self._refresh_choices()
        self.redraw()

    def _refresh_choices(self) -> None:
        """Regions and images of the current table, keeping the current ones where it has them."""
        table = self.table()
        present = [rid for rid in self.regions["id"] if (table["true_region"] == rid).any()]
        region = self.region_picker.value if self.region_picker.value in present else next(iter(present), None)
        paths = table.loc[table["true_region"] == region, "image_path"].tolist()
        image = self.image_picker.value if self.image_picker.value in paths else next(iter(paths), None)
        self._updating = True
        try:
            self.region_picker.options = [(self.names[rid], rid) for rid in present]
            self.region_picker.value = region
            self.image_picker.options = paths
            self.image_picker.value = image
        finally:
            self._updating = False

    def redraw(self) -> None:
        """Show the figure of the selected model and image in ``output``.

        The Output widget's ``outputs`` are set directly rather than captured with ``with output:
        display(...)``: the capture protocol's messages sometimes leave a batch executor (papermill's
        nbclient) waiting forever on the cell, and a direct state update shows the same picture.
        """
        self.shown = None
        if self.image_picker.value is None:
            self.output.outputs = ()
            return
        self.shown = self.figure(self.image_picker.value)
        png, metadata = figure_png(self.shown)
        self.output.outputs = ({"output_type": "display_data",
                                "data": {"image/png": png, "text/plain": f"Figure: {metadata['alt']}"},
                                "metadata": {"image/png": metadata}},)

    def figure(self, image_path: str, model: str | None = None, method: str | None = None) -> Figure:
        """The image, its top-k probabilities under ``model`` (default: the selected one) and a map of the
        true point, the predicted centroids and, for a coordinate ``method`` other than centroid, its answer."""
        model = model or self.model_picker.value
        method = method or self.method_picker.value
        table = self.predictions[model]
        rows = table.index[table["image_path"] == image_path]
        if not len(rows):
            raise KeyError(f"{image_path!r} is not in the {model!r} predictions")
        pred = table.loc[rows[0]]
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
        ax_bar.set_title(f"{self.labels[model]}: top-{len(top)} (error {pred['error_km']:.1f} km)")

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
        answer = self._answer(model, method, image_path)
        if answer is not None:
            point = gpd.GeoSeries(gpd.points_from_xy([answer["pred_lon"]], [answer["pred_lat"]]), crs="EPSG:4326")
            point.to_crs(MAP_CRS).plot(ax=ax_map, marker="X", markersize=160, color="tab:blue",
                                       label=f"{method}: {answer['error_km']:.2f} km off")
        ax_map.legend(loc="lower left", fontsize=8)
        ax_map.set_axis_off()
        ax_map.set_title("map (EPSG:3310)")
        fig.tight_layout()
        fig.set_label(f"{self.labels[model]} on {pred['image_path']} (true: {self.names[pred['true_region']]}): "
                      + ", ".join(f"{self.names[r]} {p:.0%}" for r, p in zip(top, probs))
                      + f"; error {pred['error_km']:.1f} km"
                      + (f"; {method} {answer['error_km']:.2f} km" if answer is not None else ""))  # the alt text
        return fig

    def _answer(self, model: str, method: str, image_path: str) -> pd.Series | None:
        """The coordinate ``method``'s answer for one image (None for centroid, or without coordinates)."""
        table = self.coordinates.get(model)
        if method == "centroid" or table is None:
            return None
        rows = table[(table["method"] == method) & (table["image_path"] == image_path)]
        return rows.iloc[0] if len(rows) else None
