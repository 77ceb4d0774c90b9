// A small canvas renderer for coloured point clouds: rotate (drag), zoom (wheel), and mark
// points by painting over them (mark mode). No library: orthographic projection, points
// sorted back to front, one filled square per point. Both views share the part view's canvas;
// only the one whose ``active`` is set answers the mouse.
"use strict";

// What both views share: the canvas, the marked region and its callback, the background.
class MarkableView {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.marked = new Set();
    this.markMode = false;
    this.onMark = () => {};
  }

  clearMarks() { this.marked = new Set(); this.onMark(0); this.draw(); }

  // Tell the page how many are marked, and redraw with them.
  marksChanged() { this.onMark(this.marked.size); this.draw(); }

  // Paint the background; true when there is something to draw on it.
  clear(hasContent) {
    const { ctx, canvas } = this;
    ctx.fillStyle = "#101418";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    return hasContent;
  }
}

class PointView extends MarkableView {
  constructor(canvas) {
    super(canvas);
    this.yaw = 0.6; this.pitch = -0.5; this.zoom = 1.0;
    this.xyz = null; this.rgb = null; this.n = 0;
    this.projected = null;
    let drag = null;
    canvas.addEventListener("mousedown", (e) => {
      if (!this.active) return;
      drag = { x: e.offsetX, y: e.offsetY };
      if (this.markMode) this.paint(e.offsetX, e.offsetY);
    });
    window.addEventListener("mouseup", () => { drag = null; });
    canvas.addEventListener("mousemove", (e) => {
      if (!drag || !this.active) return;
      if (this.markMode) { this.paint(e.offsetX, e.offsetY); return; }
      this.yaw += (e.offsetX - drag.x) * 0.01;
      this.pitch += (e.offsetY - drag.y) * 0.01;
      drag = { x: e.offsetX, y: e.offsetY };
      this.draw();
    });
    canvas.addEventListener("wheel", (e) => {
      if (!this.active) return;
      e.preventDefault();
      this.zoom = Math.min(20, Math.max(0.2, this.zoom * (e.deltaY < 0 ? 1.15 : 1 / 1.15)));
      this.draw();
    }, { passive: false });
  }

  set(view) {
    this.xyz = Float32Array.from(view.xyz);
    this.rgb = Uint8Array.from(view.rgb);
    this.index = view.index;
    this.n = this.xyz.length / 3;
    this.radius = view.radius || 1;
    this.marked = new Set();
    this.draw();
  }

  // Mark every point drawn within 8 px of (x, y); the region holds scan indices.
  paint(x, y) {
    if (!this.projected) return;
    const p = this.projected, r2 = 64;
    for (let i = 0; i < this.n; i++) {
      const dx = p[2 * i] - x, dy = p[2 * i + 1] - y;
      if (dx * dx + dy * dy <= r2) this.marked.add(this.index[i]);
    }
    this.marksChanged();
  }

  draw() {
    const { ctx, canvas } = this;
    if (!this.clear(this.n > 0)) return;
    const cy = Math.cos(this.yaw), sy = Math.sin(this.yaw), cp = Math.cos(this.pitch), sp = Math.sin(this.pitch);
    const scale = this.zoom * 0.45 * Math.min(canvas.width, canvas.height) / this.radius;
    const w2 = canvas.width / 2, h2 = canvas.height / 2;
    const proj = new Float32Array(2 * this.n), depth = new Float32Array(this.n);
    const order = new Uint32Array(this.n);
    for (let i = 0; i < this.n; i++) {
      const x = this.xyz[3 * i], y = this.xyz[3 * i + 1], z = this.xyz[3 * i + 2];
      const x1 = cy * x + sy * y, y1 = -sy * x + cy * y;        // yaw about z
      const y2 = cp * y1 - sp * z, z2 = sp * y1 + cp * z;       // pitch about x
      proj[2 * i] = w2 + scale * x1;
      proj[2 * i + 1] = h2 - scale * z2;
      depth[i] = y2;
      order[i] = i;
    }
    order.sort((a, b) => depth[b] - depth[a]);
    const size = Math.max(1.5, Math.min(4, 2.2 * this.zoom));
    for (const i of order) {
      const m = this.marked.size && this.marked.has(this.index[i]);
      ctx.fillStyle = m ? "#ff00ff" : `rgb(${this.rgb[3 * i]},${this.rgb[3 * i + 1]},${this.rgb[3 * i + 2]})`;
      ctx.fillRect(proj[2 * i] - size / 2, proj[2 * i + 1] - size / 2, size, size);
    }
    this.projected = proj;
  }
}

// An organized frame: the heat-map overlay as an image; marking paints pixels (row * width + col).
class ImageView extends MarkableView {
  constructor(canvas) {
    super(canvas);
    this.img = null; this.showBase = false;
    let down = false;
    canvas.addEventListener("mousedown", (e) => { down = this.active; if (down && this.markMode) this.paint(e.offsetX, e.offsetY); });
    window.addEventListener("mouseup", () => { down = false; });
    canvas.addEventListener("mousemove", (e) => { if (down && this.active && this.markMode) this.paint(e.offsetX, e.offsetY); });
  }

  set(view) {
    this.view = view;
    this.marked = new Set();
    this.images = {};
    let pending = 2;
    for (const key of ["base", "overlay"]) {
      const img = new Image();
      img.onload = () => { if (--pending === 0) this.draw(); };
      img.src = view[key];
      this.images[key] = img;
    }
  }

  fit() {
    const { width, height } = this.view;
    const s = Math.min(this.canvas.width / width, this.canvas.height / height);
    return { s, ox: (this.canvas.width - s * width) / 2, oy: (this.canvas.height - s * height) / 2 };
  }

  paint(x, y) {
    const { s, ox, oy } = this.fit(), { width, height } = this.view;
    const col = Math.floor((x - ox) / s), row = Math.floor((y - oy) / s), r = Math.max(1, Math.round(6 / s));
    for (let dr = -r; dr <= r; dr++) for (let dc = -r; dc <= r; dc++) {
      const rr = row + dr, cc = col + dc;
      if (rr >= 0 && rr < height && cc >= 0 && cc < width && dr * dr + dc * dc <= r * r) this.marked.add(rr * width + cc);
    }
    this.marksChanged();
  }

  draw() {
    const { ctx } = this;
    if (!this.clear(Boolean(this.view))) return;
    const { s, ox, oy } = this.fit(), { width } = this.view;
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(this.showBase ? this.images.base : this.images.overlay, ox, oy, s * width, s * this.view.height);
    ctx.fillStyle = "rgba(255,0,255,0.8)";
    for (const p of this.marked) ctx.fillRect(ox + (p % width) * s, oy + Math.floor(p / width) * s, Math.max(1, s), Math.max(1, s));
  }
}

window.PointView = PointView;
window.ImageView = ImageView;
