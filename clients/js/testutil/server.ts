// Starts the real Python roomsecrets server for the tests and mints tokens with its CLI.
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const PACKAGE_DIR = fileURLToPath(new URL("../../", import.meta.url)); // dist/testutil/ → clients/js/
/** The server CLI: $ROOMSECRETS_BIN, else the repository's .venv. */
export const BIN = process.env.ROOMSECRETS_BIN
  ? resolve(process.env.ROOMSECRETS_BIN)
  : resolve(PACKAGE_DIR, "../../.venv/bin/roomsecrets");

export interface TestServer {
  baseUrl: string;
  dataDir: string;
  /** A participant JWT for `identity` in `room` (default "room1"). */
  token(identity: string, room?: string): string;
  stop(): Promise<void>;
}

export async function startServer(): Promise<TestServer> {
  const dataDir = mkdtempSync(join(tmpdir(), "roomsecrets-js-"));
  const child: ChildProcess = spawn(
    BIN,
    ["serve", "--data-dir", dataDir, "--listen", "127.0.0.1:0", "--shutdown-grace", "1", "--log-level", "WARNING"],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let stderr = "";
  const port = await new Promise<number>((done, fail) => {
    const timer = setTimeout(() => fail(new Error(`server did not start in 30 s:\n${stderr}`)), 30_000);
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", (chunk: string) => {
      stderr += chunk;
      const match = /serving on 127\.0\.0\.1:(\d+)/.exec(stderr);
      if (match) {
        clearTimeout(timer);
        done(Number(match[1]));
      }
    });
    child.once("error", (error) => (clearTimeout(timer), fail(error)));
    child.once("exit", (code) => (clearTimeout(timer), fail(new Error(`server exited (${code}):\n${stderr}`))));
  });
  const exited = new Promise<void>((done) => child.once("exit", () => done()));
  return {
    baseUrl: `http://127.0.0.1:${port}`,
    dataDir,
    token: (identity, room = "room1") =>
      execFileSync(BIN, ["token", "--data-dir", dataDir, "--identity", identity, "--room", room], {
        encoding: "utf8",
      }).trim(),
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGTERM");
        const killer = setTimeout(() => child.kill("SIGKILL"), 10_000);
        await exited;
        clearTimeout(killer);
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}
