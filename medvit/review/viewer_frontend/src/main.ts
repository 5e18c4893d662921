// medvit's image viewer: Cornerstone3D's StackViewport showing the lossless modality values the Python side sends,
// with its Zoom, Pan and WindowLevel tools, window presets in the image's own units, a lossy-source badge and a
// saliency layer kept aligned with the image through the viewport's own world-to-canvas transform.
import {
  cache,
  Enums,
  eventTarget,
  getRenderingCapabilities,
  getRenderingEngine,
  imageLoader,
  init as initCore,
  RenderingEngine,
  type Types,
  utilities,
} from "@cornerstonejs/core";
import {
  addTool,
  Enums as ToolEnums,
  init as initTools,
  PanTool,
  ToolGroupManager,
  WindowLevelTool,
  ZoomTool,
} from "@cornerstonejs/tools";
import { listen, type RenderArgs, setComponentValue, setFrameHeight } from "./streamlit";

const ENGINE = "medvit-engine";
const VIEWPORT = "medvit-stack";
const TOOLS = "medvit-tools";
const ZOOM_STEP = 1.25;

interface Preset {
  key: string;
  label: string;
  center: number;
  width: number;
}

interface Legend {
  title: string;
  low: string;
  high: string;
  colorbar: string; // data: URL of the colour scale
}

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const element = $<HTMLDivElement>("viewport");
const stage = $<HTMLDivElement>("stage");
const overlay = $<HTMLImageElement>("overlay");
const status = $<HTMLDivElement>("status");

let ready: Promise<void> | null = null;
let imageKey = "";
let imageId = "";
let overlayKey = "";
let presets: Preset[] = [];
let baseInvert = false;
let size: [number, number] = [0, 0]; // rows, columns

function viewport(): Types.IStackViewport {
  return getRenderingEngine(ENGINE)!.getViewport(VIEWPORT) as Types.IStackViewport;
}

async function setUp(): Promise<void> {
  initCore(); // falls back to CPU rendering when the browser has no WebGL (e.g. headless Chromium)
  initTools();
  const engine = new RenderingEngine(ENGINE);
  engine.enableElement({
    viewportId: VIEWPORT,
    type: Enums.ViewportType.STACK,
    element,
    defaultOptions: { background: [0, 0, 0] as Types.Point3 },
  });
  for (const tool of [WindowLevelTool, PanTool, ZoomTool]) addTool(tool);
  const group = ToolGroupManager.createToolGroup(TOOLS)!;
  for (const tool of [WindowLevelTool, PanTool, ZoomTool]) group.addTool(tool.toolName);
  const { MouseBindings, KeyboardBindings } = ToolEnums;
  group.setToolActive(WindowLevelTool.toolName, { bindings: [{ mouseButton: MouseBindings.Primary }] });
  group.setToolActive(PanTool.toolName, {
    bindings: [
      { mouseButton: MouseBindings.Auxiliary },
      { mouseButton: MouseBindings.Primary, modifierKey: KeyboardBindings.Shift },
    ],
  });
  group.setToolActive(ZoomTool.toolName, {
    bindings: [{ mouseButton: MouseBindings.Secondary }, { mouseButton: MouseBindings.Wheel }],
  });
  group.addViewport(VIEWPORT, ENGINE);
  element.addEventListener("contextmenu", (e) => e.preventDefault());
  for (const event of [Enums.Events.IMAGE_RENDERED, Enums.Events.VOI_MODIFIED, Enums.Events.CAMERA_MODIFIED]) {
    element.addEventListener(event, update);
  }
  eventTarget.addEventListener(Enums.Events.IMAGE_LOAD_ERROR, ((event: CustomEvent) => {
    const detail = event.detail;
    const error = Array.isArray(detail) ? detail.map((d) => d.reason).join("; ") : detail?.error;
    status.textContent = `The viewer could not show this image: ${error}`;
    console.error("image load error", error, error?.stack);
  }) as EventListener);
  document.body.dataset.renderer = getRenderingCapabilities().webgl ? "gpu" : "cpu";
  new ResizeObserver(() => getRenderingEngine(ENGINE)?.resize(true, true)).observe(stage);
}

const ARRAYS = { uint8: Uint8Array, int16: Int16Array, uint16: Uint16Array, float32: Float32Array } as const;

async function showImage(args: RenderArgs): Promise<void> {
  const rows = args.rows as number;
  const columns = args.columns as number;
  const Array_ = ARRAYS[args.dtype as keyof typeof ARRAYS];
  const scalarData = new Array_((args.pixels as Uint8Array).slice().buffer); // a copy: aligned for the type
  if (scalarData.length !== rows * columns) throw new Error(`pixel payload has ${scalarData.length} values`);
  const spacing = (args.spacing as [number, number] | null) ?? [1, 1];
  cache.purgeCache();
  imageId = `medvit:${args.image_key}`;
  const image = imageLoader.createAndCacheLocalImage(imageId, {
    scalarData,
    dimensions: [columns, rows],
    spacing: [spacing[1], spacing[0]],
    frameOfReferenceUID: `medvit-${args.image_key}`,
  });
  const first = presets[0]; // the header's window: Cornerstone's own initial VOI too
  const modules: Record<string, object> = {
    generalSeriesModule: { modality: String(args.modality || "OT") },
    modalityLutModule: { rescaleSlope: 1, rescaleIntercept: 0 }, // the payload holds modality values already
  };
  for (const [type, metadata] of Object.entries(modules)) {
    utilities.genericMetadataProvider.add(imageId, { type, metadata });
  }
  if (first) Object.assign(image, { windowCenter: first.center, windowWidth: first.width });
  size = [rows, columns];
  getRenderingEngine(ENGINE)!.resize(true, false); // the stage's height is set: fit the image to it
  await viewport().setStack([imageId]);
  reset();
  status.textContent = "";
}

function applyPreset(preset: Preset): void {
  const voiRange = utilities.windowLevel.toLowHighRange(preset.width, preset.center);
  viewport().setProperties({ voiRange });
  viewport().render();
  markPreset(preset.key);
}

function markPreset(key: string | undefined): void {
  for (const button of document.querySelectorAll<HTMLButtonElement>("#presets button")) {
    button.classList.toggle("active", button.dataset.key === key);
  }
}

function reset(): void {
  viewport().resetCamera();
  if (presets.length) applyPreset(presets[0]);
  setInverted(baseInvert);
}

function zoomBy(factor: number): void {
  const vp = viewport();
  vp.setZoom(vp.getZoom() * factor);
  vp.render();
}

/** The lookup table actually in use (GPU rendering), whose direction is what the reader sees. */
function lookupTable(): any {
  const actor = viewport().getDefaultActor?.()?.actor as any;
  return actor?.getProperty?.().getRGBTransferFunction?.(0);
}

function isInverted(): boolean {
  const table = lookupTable();
  if (!table) return Boolean(viewport().getProperties().invert);
  const [low, high] = table.getRange();
  const rgb: number[] = [];
  table.getTable(low, high, 2, rgb);
  return rgb[0] > rgb[3];
}

/** Show the image inverted or not. Cornerstone's own `invert` property flips relative to a flag that a new
 * stack's lookup table does not always follow (MONOCHROME1 came up uninverted), so the table is checked. */
function setInverted(inverted: boolean): void {
  const vp = viewport();
  const table = lookupTable();
  if (!table) vp.setProperties({ invert: inverted }); // CPU rendering: the property is the display
  else if (isInverted() !== inverted) utilities.invertRgbTransferFunction(table);
  Object.assign(vp, { invert: inverted }); // keep the viewport's flag in step with the table
  document.body.dataset.inverted = String(inverted);
  vp.render();
}

function invert(): void {
  setInverted(!isInverted());
}

/** The readouts (window in the image's units, screen pixels per image pixel) and the overlay's placement. */
function update(): void {
  if (!imageId) return;
  const vp = viewport();
  const range = vp.getProperties().voiRange;
  if (range) {
    const { windowWidth, windowCenter } = utilities.windowLevel.toWindowLevel(range.lower, range.upper);
    $("wl").textContent = `W ${fmt(windowWidth)} / C ${fmt(windowCenter)}`;
    $("wl").dataset.width = String(windowWidth);
    $("wl").dataset.center = String(windowCenter);
  }
  const topLeft = vp.worldToCanvas(utilities.imageToWorldCoords(imageId, [0, 0]) as Types.Point3);
  const bottomRight = vp.worldToCanvas(utilities.imageToWorldCoords(imageId, [size[1], size[0]]) as Types.Point3);
  const scale = (bottomRight[0] - topLeft[0]) / size[1];
  $("zoom").textContent = `Zoom ${vp.getZoom().toFixed(2)}× · ${(scale * 100).toFixed(0)}% of full resolution`;
  $("zoom").dataset.scale = String(scale);
  Object.assign(overlay.style, {
    left: `${topLeft[0]}px`,
    top: `${topLeft[1]}px`,
    width: `${bottomRight[0] - topLeft[0]}px`,
    height: `${bottomRight[1] - topLeft[1]}px`,
  });
}

function fmt(value: number): string {
  return Math.abs(value) >= 100 ? value.toFixed(0) : value.toFixed(value % 1 ? 2 : 0);
}

function showPresets(): void {
  const holder = $("presets");
  holder.replaceChildren(
    ...presets.map((preset) => {
      const button = document.createElement("button");
      button.textContent = preset.label;
      button.title = `${preset.label}: W ${fmt(preset.width)} / C ${fmt(preset.center)} (${preset.key})`;
      button.dataset.key = preset.key;
      button.onclick = () => applyPreset(preset);
      return button;
    }),
  );
}

function showOverlay(args: RenderArgs): void {
  const key = String(args.overlay_key ?? "");
  if (key !== overlayKey) {
    overlayKey = key;
    const png = args.overlay as Uint8Array | null;
    if (overlay.src.startsWith("blob:")) URL.revokeObjectURL(overlay.src);
    overlay.removeAttribute("src");
    if (png) overlay.src = URL.createObjectURL(new Blob([png], { type: "image/png" }));
    overlay.style.display = png ? "block" : "none";
  }
  const legend = args.legend as Legend | null;
  $("legend").style.display = legend ? "flex" : "none";
  if (legend) {
    $("legend-title").textContent = legend.title;
    $("legend-low").textContent = legend.low;
    $("legend-high").textContent = legend.high;
    $<HTMLImageElement>("colorbar").src = legend.colorbar;
  }
}

function layout(args: RenderArgs): void {
  const screen = window.parent?.innerHeight || window.innerHeight;
  const height = Math.max(420, Math.round(screen - (Number(args.reserve) || 110)));
  const chrome = $("bar").offsetHeight + $("legend").offsetHeight + $("help").offsetHeight;
  stage.style.height = `${height - chrome}px`;
  setFrameHeight(height);
}

document.addEventListener("keydown", (event) => {
  if (!imageId || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  const preset = presets.find((p) => p.key.toLowerCase() === key);
  if (preset) applyPreset(preset);
  else if (key === "i") invert();
  else if (key === "r") reset();
  else if (key === "+" || key === "=") zoomBy(ZOOM_STEP);
  else if (key === "-" || key === "_") zoomBy(1 / ZOOM_STEP);
  else return;
  event.preventDefault();
});
$("invert").onclick = invert;
$("reset").onclick = reset;
$("zoom-in").onclick = () => zoomBy(ZOOM_STEP);
$("zoom-out").onclick = () => zoomBy(1 / ZOOM_STEP);

listen(async (args) => {
  showOverlay(args);
  const lossy = args.lossy as string | null;
  $("lossy").style.display = lossy ? "inline" : "none";
  $("lossy").textContent = lossy ? `LOSSY: ${lossy}` : "";
  layout(args); // after the badge and legend: they may add a line to the chrome above and below the image
  if (args.image_key === imageKey) return;
  if (!args.pixels) {
    // The page sends an image's pixels only until this frame says it holds them (a 7 MB payload must not travel
    // again with every overlay change); a new frame (remounted) asks for them once.
    setComponentValue({ image: null, need: args.image_key });
    return;
  }
  imageKey = String(args.image_key);
  presets = (args.presets as Preset[]) ?? [];
  baseInvert = Boolean(args.invert);
  showPresets();
  status.textContent = "Loading…";
  try {
    ready ??= setUp();
    await ready;
    await showImage(args);
    setComponentValue({ image: imageKey }); // the page stops sending these pixels
  } catch (error) {
    status.textContent = `The viewer could not show this image: ${error}`;
    console.error(error);
  }
});
