// Server-Sent Events (text/event-stream) parsed by the rules of the HTML standard, for
// streams read with fetch(): EventSource cannot send a POST or an Authorization header.
//
//     const parser = new EventStreamParser(({ type, data, lastEventId }) => { ... });
//     parser.feed(text);   // decoded text, in pieces of any size (a TextDecoder's output)
//     parser.reset();      // before reading a new response: drops what is unfinished
//
// lastEventId and retry keep what the server last sent, for a reconnection.
export class EventStreamParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.lastEventId = "";
    this.retry = null;
    this.reset();
  }

  reset() {
    this.pending = "";  // an unfinished line
    this.type = "";
    this.data = [];
    this.started = false;  // a byte order mark may open the stream, and only there
  }

  feed(text) {
    if (!this.started && text) {
      this.started = true;
      if (text.startsWith("\uFEFF")) text = text.slice(1);
    }
    this.pending += text;
    // A CR at the very end may be the first half of a CRLF: keep it for the next piece.
    const held = this.pending.endsWith("\r") ? "\r" : "";
    const lines = this.pending.slice(0, this.pending.length - held.length).split(/\r\n|\r|\n/);
    this.pending = lines.pop() + held;
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") {  // a blank line dispatches the event, if it has data
      const data = this.data, type = this.type || "message";
      this.data = [];
      this.type = "";
      if (data.length) this.onEvent({ type, data: data.join("\n"), lastEventId: this.lastEventId });
      return;
    }
    if (line.startsWith(":")) return;  // a comment, such as a keep-alive
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);  // one space only is syntax
    if (name === "data") this.data.push(value);
    else if (name === "event") this.type = value;
    else if (name === "id" && !value.includes("\0")) this.lastEventId = value;
    else if (name === "retry" && /^[0-9]+$/.test(value)) this.retry = Number(value);
  }
}
