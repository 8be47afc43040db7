// The browser side of valueloss.viz.canvas.FigureView: paints a matplotlib figure from what Python sends.
// `background` is a PNG of the figure without its changing artists (Agg rendered it); `frame` is the list of
// paths and images those artists drew, in pixels, written down by valueloss/viz/frames.py (format there).
// This file draws; it computes nothing: every coordinate and colour comes from matplotlib in the kernel.

function bytesOf(value) {
  if (value instanceof DataView) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  return new Uint8Array(0);
}

export function parseFrame(value) {
  const bytes = bytesOf(value);
  if (bytes.length < 4) return null;
  const size = new DataView(bytes.buffer, bytes.byteOffset, 4).getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(4, 4 + size)));
  // A copy of the body: typed arrays need aligned offsets, which a slice of the message may not have.
  header.body = bytes.slice(4 + size).buffer;
  return header;
}

const css = (rgba) => `rgba(${rgba[0] * 255},${rgba[1] * 255},${rgba[2] * 255},${rgba[3]})`;

function tracePath(ctx, body, op) {
  const [offset, count] = op.path;
  const xy = new Float32Array(body, offset, 2 * count);
  const codes = new Uint8Array(body, op.codes, count);
  ctx.beginPath();
  for (let i = 0; i < count; i++) {
    const x = xy[2 * i], y = xy[2 * i + 1];
    switch (codes[i]) {
      case 1: ctx.moveTo(x, y); break;                        // MOVETO
      case 2: ctx.lineTo(x, y); break;                        // LINETO
      case 3: ctx.quadraticCurveTo(x, y, xy[2 * i + 2], xy[2 * i + 3]); i += 1; break;   // CURVE3
      case 4: ctx.bezierCurveTo(x, y, xy[2 * i + 2], xy[2 * i + 3], xy[2 * i + 4], xy[2 * i + 5]);
        i += 2; break;                                        // CURVE4
      case 79: ctx.closePath(); break;                        // CLOSEPOLY
      default: break;
    }
  }
}

// The frame's images (PNG) as bitmaps, decoded off the page's main thread; in the order of its ops.
export function decodeImages(frame) {
  return Promise.all(frame.ops.filter((op) => op.image).map((op) => {
    const [offset, size] = op.image;
    return createImageBitmap(new Blob([new Uint8Array(frame.body, offset, size)], { type: 'image/png' }));
  }));
}

export function replay(ctx, frame, background, images) {
  ctx.save();
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, ctx.canvas.width, ctx.canvas.height);
  if (background) ctx.drawImage(background, 0, 0);
  let next = 0;
  for (const op of frame.ops) {
    ctx.save();
    if (op.clip) { ctx.beginPath(); ctx.rect(op.clip[0], op.clip[1], op.clip[2], op.clip[3]); ctx.clip(); }
    if (op.image) {
      ctx.drawImage(images[next++], op.x, op.y);
    } else {
      tracePath(ctx, frame.body, op);
      if (op.fill) { ctx.fillStyle = css(op.fill); ctx.fill(); }
      if (op.stroke && op.width > 0) {
        ctx.strokeStyle = css(op.stroke);
        ctx.lineWidth = op.width;
        ctx.lineCap = op.cap;
        ctx.lineJoin = op.join;
        if (op.dashes) { ctx.setLineDash(op.dashes[1]); ctx.lineDashOffset = op.dashes[0]; }
        ctx.stroke();
      }
    }
    ctx.restore();
  }
  ctx.restore();
}

function render({ model, el }) {
  const canvas = document.createElement('canvas');
  el.classList.add('valueloss-figure');
  el.appendChild(canvas);
  const ctx = canvas.getContext('2d');
  let background = null, backgroundId = null, decoding = null, latest = 0;

  // Only the newest frame is painted: one whose images finish decoding after a newer frame arrived is dropped.
  const paint = async () => {
    const ticket = ++latest;
    const frame = parseFrame(model.get('frame'));
    if (!frame) return;
    const images = await decodeImages(frame);
    if (ticket !== latest || frame.background !== backgroundId) {  // stale, or its background still decoding
      images.forEach((image) => image.close());
      return;
    }
    const ratio = frame.ratio || 1;  // what the kernel drew it at: until a sharper frame comes, the same size
    if (canvas.width !== frame.width || canvas.height !== frame.height) {
      canvas.width = frame.width; canvas.height = frame.height;
    }
    canvas.style.width = `${frame.width / ratio}px`; canvas.style.height = `${frame.height / ratio}px`;
    replay(ctx, frame, background, images);
    images.forEach((image) => image.close());
  };
  const load = () => {
    const id = model.get('background_id');
    const blob = new Blob([bytesOf(model.get('background'))], { type: 'image/png' });
    const job = createImageBitmap(blob).then((bitmap) => {
      if (decoding !== job) { bitmap.close(); return; }  // a newer background replaced this one
      if (background) background.close();
      background = bitmap; backgroundId = id; decoding = null;
      paint();
    }).catch((error) => console.error('valueloss: the figure background could not be decoded', error));
    decoding = job;
  };
  model.on('change:background', load);
  model.on('change:frame', paint);
  load();
  // A screen with more pixels than CSS pixels (a "retina" screen): ask the kernel for a sharper figure.
  if ((window.devicePixelRatio || 1) !== model.get('pixel_ratio')) {
    model.set('pixel_ratio', window.devicePixelRatio || 1);
    model.save_changes();
  }
  return () => { if (background) background.close(); };
}

export default { render };
