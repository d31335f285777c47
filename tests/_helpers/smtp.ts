/**
 * A capture SMTP server for tests: `smtp-server` on a free loopback port, no
 * TLS, any or no login accepted; every message is parsed with `mailparser`.
 */
import { SMTPServer } from "smtp-server";
// mailparser ships no type declarations: it comes in as any and is typed below.
import { simpleParser as untypedParser } from "mailparser";
import { freePort } from "./processes.ts";

/** The fields of mailparser's ParsedMail read here. */
interface ParsedMail {
  from?: { text?: string };
  to?: { text?: string } | { text?: string }[];
  subject?: string;
  text?: string;
  html?: string | false;
}
const simpleParser = untypedParser as (stream: NodeJS.ReadableStream) => Promise<ParsedMail>;

/** A parsed captured message. */
export interface CapturedMail {
  from: string;
  to: string;
  subject: string;
  text: string;
  html: string;
}

/** A running capture server. */
export interface SmtpCapture {
  port: number;
  messages: CapturedMail[];
  /** The `SMTP_*` and `ALERT_EMAIL` variables that point the backup check here. */
  env(): Record<string, string>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Starts the capture server. */
export async function startSmtpCapture(): Promise<SmtpCapture> {
  const port = freePort();
  const messages: CapturedMail[] = [];
  const server = new SMTPServer({
    authOptional: true,
    // nodemailer would try STARTTLS against the built-in self-signed certificate.
    disabledCommands: ["STARTTLS"],
    logger: false,
    onAuth(_auth, _session, callback) {
      callback(null, { user: "test" });
    },
    onData(stream, _session, callback) {
      simpleParser(stream).then((mail) => {
        const addresses = (v: ParsedMail["to"]) =>
          (Array.isArray(v) ? v : v ? [v] : []).map((a) => a.text ?? "").join(", ");
        messages.push({
          from: addresses(mail.from),
          to: addresses(mail.to),
          subject: mail.subject ?? "",
          text: mail.text ?? "",
          html: typeof mail.html === "string" ? mail.html : "",
        });
        callback();
      }, (err: Error) => callback(err));
    },
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", () => resolve());
  });
  return {
    port,
    messages,
    env() {
      return {
        SMTP_HOST: "127.0.0.1",
        SMTP_PORT: String(port),
        SMTP_USER: "backup",
        SMTP_PASSWORD: "secret",
        SMTP_FROM: "denokv <backup@example.test>",
        ALERT_EMAIL: "owner@example.test",
      };
    },
    async [Symbol.asyncDispose]() {
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
