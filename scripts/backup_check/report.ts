/**
 * Turns a check record into an e-mail (subject, text, HTML) and delivers it
 * with nodemailer, or writes it under `$DATA_DIR/reports/` when there is no
 * SMTP server or it cannot be reached.
 */
import nodemailer from "nodemailer";
import { join } from "node:path";
import type { SmtpConfig } from "./config.ts";
import type { CheckRecord } from "./history.ts";

/** A rendered report. */
export interface Report {
  subject: string;
  text: string;
  html: string;
}

function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(2)} s`;
}

/** Renders the subject and both bodies: one row per check with result, figure and time. */
export function renderReport(record: CheckRecord): Report {
  const date = record.startedAt.slice(0, 10);
  const subject = `[${record.app}] Backup check ${record.status} ${date}` +
    (record.failedStep ? ` (failed: ${record.failedStep})` : "");
  const header = `Backup check ${record.status} for ${record.app} at ${record.startedAt}` +
    `\nCanary: ${record.canaryId}` +
    (record.failedStep ? `\nFirst failing step: ${record.failedStep}` : "");
  const rows = record.checks.map((c) =>
    `${c.ok ? "OK  " : "FAIL"}  ${c.name.padEnd(16)} ${seconds(c.ms).padStart(9)}  ${c.detail}`
  );
  const text = `${header}\n\n${rows.join("\n")}\n`;
  const htmlRows = record.checks.map((c) =>
    `<tr><td>${escapeHtml(c.name)}</td><td style="color:${c.ok ? "green" : "red"}">${
      c.ok ? "OK" : "FAIL"
    }</td><td>${escapeHtml(c.detail)}</td><td>${seconds(c.ms)}</td></tr>`
  );
  const html = `<!doctype html><html><body>` +
    `<h1>Backup check ${escapeHtml(record.status)}: ${escapeHtml(record.app)}</h1>` +
    `<p>${escapeHtml(record.startedAt)}<br>Canary: <code>${escapeHtml(record.canaryId)}</code>` +
    (record.failedStep
      ? `<br>First failing step: <strong>${escapeHtml(record.failedStep)}</strong>`
      : "") +
    `</p><table border="1" cellpadding="4" cellspacing="0">` +
    `<tr><th>check</th><th>result</th><th>figure</th><th>time</th></tr>` +
    `${htmlRows.join("")}</table></body></html>`;
  return { subject, text, html };
}

/** Sends `report`: implicit TLS on 465, STARTTLS required on 587, as the port implies. */
export async function sendReport(smtp: SmtpConfig, report: Report): Promise<void> {
  const transport = nodemailer.createTransport({
    host: smtp.host,
    port: smtp.port,
    secure: smtp.port === 465,
    requireTLS: smtp.port === 587,
    auth: smtp.user ? { user: smtp.user, pass: smtp.password ?? "" } : undefined,
    connectionTimeout: 15_000,
    greetingTimeout: 15_000,
    socketTimeout: 30_000,
  });
  try {
    await transport.sendMail({
      from: smtp.from,
      to: smtp.to,
      subject: report.subject,
      text: report.text,
      html: report.html,
    });
  } finally {
    transport.close();
  }
}

/** Writes `report` as `<reports>/backup-check-<time>.txt` and `.html`; returns the text path. */
export async function saveReport(dataDir: string, record: CheckRecord, report: Report) {
  const dir = join(dataDir, "reports");
  await Deno.mkdir(dir, { recursive: true });
  const stamp = record.startedAt.replace(/[:.]/g, "-");
  const base = join(dir, `backup-check-${stamp}`);
  await Deno.writeTextFile(`${base}.txt`, `Subject: ${report.subject}\n\n${report.text}`);
  await Deno.writeTextFile(`${base}.html`, report.html);
  return `${base}.txt`;
}
