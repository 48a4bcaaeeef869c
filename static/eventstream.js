// Reads an event stream (text/event-stream) by the HTML standard's rules, as EventSource
// does, for pages that read it with fetch() so that they can send headers EventSource cannot
// (Authorization). One module, shared by every page, so that no page has a parser of its own:
//
//   import { EventStreamParser } from "/static/eventstream.js";
//   const parser = new EventStreamParser(({ type, data, lastEventId }) => show(type, data));
//   const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
//   parser.feed(value);   // each piece of text as it arrives, cut anywhere
//   parser.reset();       // before reading a new connection; then send parser.lastEventId
//
// TextDecoderStream decodes UTF-8 whatever charset the response names, and drops a byte
// order mark at the start: that is the standard's decoding too.

const LINE_END = /\r\n|\r|\n/;

export class EventStreamParser {
  #onEvent; #pending; #type; #data; #afterCR; #id;  // a line and an event, both unfinished

  constructor(onEvent) {
    this.#onEvent = onEvent;  // called with { type, data, lastEventId } for each event
    this.lastEventId = "";    // committed: the id of the last event dispatched, to resume after
    this.retry = null;        // the milliseconds the server asked to wait before reconnecting
    this.reset();
  }

  // A new connection: nothing unfinished on the last one (a line, an event) carries over.
  reset() {
    this.#pending = "";
    this.#type = "";
    this.#data = [];
    this.#afterCR = false;
    this.#id = this.lastEventId;  // set by `id:`; committed only when its event is dispatched
  }

  feed(text) {
    // A CR ends its line at once; an LF first in the next piece is the rest of a CRLF.
    const skip = this.#afterCR && text.startsWith("\n");
    this.#afterCR = text.endsWith("\r") || (this.#afterCR && text === "");
    const lines = (this.#pending + (skip ? text.slice(1) : text)).split(LINE_END);
    this.#pending = lines.pop();  // the last line may still be incomplete
    for (const line of lines) this.#line(line);
  }

  #line(line) {
    if (line === "") {  // a blank line ends the event
      // Only now is its id the last one seen: an event cut off by a drop was never seen.
      this.lastEventId = this.#id;
      const event = { type: this.#type || "message", data: this.#data.join("\n"), lastEventId: this.#id };
      const empty = this.#data.length === 0;
      this.#type = "";
      this.#data = [];
      if (!empty) this.#onEvent(event);
      return;
    }
    const colon = line.indexOf(":");
    if (colon === 0) return;  // a comment (": keep-alive")
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);  // only one space is part of the syntax
    if (name === "data") this.#data.push(value);
    else if (name === "event") this.#type = value;
    else if (name === "id" && !value.includes("\0")) this.#id = value;
    else if (name === "retry" && /^[0-9]+$/.test(value)) this.retry = Number(value);
  }
}
