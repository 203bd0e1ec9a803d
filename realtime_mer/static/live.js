// The live view in the page: the camera's frames go to the server over a WebSocket
// (realtime_mer/live_socket.py) and each annotated frame is shown as it comes back. Up to
// FRAMES_IN_FLIGHT frames are on their way at once, so the next frame is already at the server
// when it finishes one; every frame sent is answered (annotated, or dropped for a newer one).
(() => {
  const FRAMES_IN_FLIGHT = 2;
  const JPEG_QUALITY = 0.85;
  const SOCKET_PATH = "/mer/live";
  const MAX_WIDTH = 1280; // wider camera frames are scaled down before they are sent
  let live = null; // {ws, stream, video, canvas, inflight, error}
  let starting = false; // a second click while the camera opens does nothing

  const byId = (id) => document.getElementById(id);
  const say = (text) => { const status = byId("mer-status"); if (status) status.textContent = text; };

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    // the demo may be served below a path (a proxy): the socket lives beside the page
    const base = location.pathname.replace(/\/[^/]*$/, "");
    return `${scheme}//${location.host}${base}${SOCKET_PATH}`;
  }

  async function start() {
    if (live || starting) return;
    starting = true;
    let stream = null;
    try {
      stream = await navigator.mediaDevices.getUserMedia(
        {video: {width: {ideal: 640}, height: {ideal: 480}, frameRate: {ideal: 30}}, audio: false});
      const video = byId("mer-camera");
      video.srcObject = stream;
      await video.play();
      const ws = new WebSocket(socketUrl());
      ws.binaryType = "arraybuffer";
      const state = {ws, stream, video, canvas: document.createElement("canvas"), inflight: 0,
                     error: null};
      live = state;
      ws.onopen = () => { say("Streaming."); nextFrames(state); };
      ws.onmessage = (message) => receive(state, message);
      ws.onclose = () => {
        if (live === state) stop(state.error || "The stream ended (the server closed it).");
      };
      ws.onerror = () => say("The connection to the demo failed.");
    } catch (error) {
      if (stream) stream.getTracks().forEach((track) => track.stop());
      say(`No camera: ${error.message || error.name}`);
    } finally {
      starting = false;
    }
  }

  function stop(text) {
    const state = live;
    live = null;
    if (state) {
      state.ws.close();
      state.stream.getTracks().forEach((track) => track.stop());
      state.video.srcObject = null;
    }
    say(text || "Stopped.");
  }

  function sendFrame(state) {
    const {ws, video, canvas} = state;
    if (live !== state || ws.readyState !== WebSocket.OPEN || !video.videoWidth) return;
    if (state.inflight >= FRAMES_IN_FLIGHT) return; // this camera frame is skipped
    const scale = Math.min(1, MAX_WIDTH / video.videoWidth);
    canvas.width = Math.round(video.videoWidth * scale);
    canvas.height = Math.round(video.videoHeight * scale);
    canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
    state.inflight += 1;
    canvas.toBlob((blob) => {
      if (blob && live === state && ws.readyState === WebSocket.OPEN) ws.send(blob);
      else state.inflight -= 1;
    }, "image/jpeg", JPEG_QUALITY);
  }

  function nextFrames(state) {
    // one send per new camera frame (a timer where the browser cannot say when one is new)
    if (state.video.requestVideoFrameCallback) {
      const onFrame = () => {
        if (live !== state) return;
        sendFrame(state);
        state.video.requestVideoFrameCallback(onFrame);
      };
      state.video.requestVideoFrameCallback(onFrame);
    } else {
      const timer = setInterval(() => (live === state ? sendFrame(state) : clearInterval(timer)), 33);
    }
  }

  function show(selector, bytes) {
    const img = document.querySelector(selector);
    if (!img) return;
    const old = img.src;
    img.src = URL.createObjectURL(new Blob([bytes], {type: "image/jpeg"}));
    if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  }

  function showLog(rows, cards) {
    const body = document.querySelector("#event-log tbody");
    if (body) {
      body.replaceChildren(...rows.map((row) => {
        const tr = document.createElement("tr");
        tr.setAttribute("role", "row");
        for (const value of row) {
          const td = document.createElement("td");
          td.textContent = value; // text, never markup
          tr.appendChild(td);
        }
        return tr;
      }));
    }
    const box = byId("cards");
    if (box) box.innerHTML = cards; // made and escaped by the server (app.event_cards)
  }

  function receive(state, message) {
    if (typeof message.data === "string") {
      const data = JSON.parse(message.data);
      if (data.error) { state.error = data.error; say(data.error); }
      if (data.log) showLog(data.log, data.cards);
      return;
    }
    const bytes = new Uint8Array(message.data);
    const kind = bytes[0];
    if (kind === 0 || kind === 1) state.inflight = Math.max(0, state.inflight - 1);
    if (kind === 1) show("#annotated img", bytes.subarray(1));
    else if (kind === 2) show("#strip img", bytes.subarray(1));
  }

  function reset() {
    if (live && live.ws.readyState === WebSocket.OPEN) live.ws.send(JSON.stringify({reset: true}));
    else showLog([], "<p>No events yet.</p>");
  }

  document.addEventListener("click", (event) => {
    const id = event.target && event.target.id;
    if (id === "mer-start") start();
    else if (id === "mer-stop") stop();
    else if (id === "mer-reset") reset();
  });
})();
