// The Streamlit custom-component protocol (API version 1): three messages out, one in.
// streamlit-component-lib would pull in React and Apache Arrow (~1 MB) for these few lines.

export type RenderArgs = Record<string, unknown>;

function send(type: string, data: Record<string, unknown> = {}): void {
  window.parent.postMessage({ isStreamlitMessage: true, type, ...data }, "*");
}

/** Call `onRender` with the component's arguments every time the Python side renders it. */
export function listen(onRender: (args: RenderArgs) => void): void {
  window.addEventListener("message", (event: MessageEvent) => {
    if (event.data?.type === "streamlit:render") onRender(event.data.args ?? {});
  });
  send("streamlit:componentReady", { apiVersion: 1 });
}

export function setFrameHeight(height: number): void {
  send("streamlit:setFrameHeight", { height });
}

/** The component's value on the Python side (`st.session_state[key]`); setting it reruns the page. */
export function setComponentValue(value: unknown): void {
  send("streamlit:setComponentValue", { value, dataType: "json" });
}
