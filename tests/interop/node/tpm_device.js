// A TPM for the Node SDK's TpmSecurityClient (azure-iot-security-tpm, tss.js):
// swtpm, started here on free loopback ports, behind a small shim that speaks
// the Microsoft TPM simulator's TCP protocol tss.js uses (swtpm's TCP server
// takes raw TPM commands):
//   TPM port:      handshake (15) -> server version 1, info 0, ack 0;
//                  send command (8): locality, length, command -> length,
//                  response, ack 0; session end (20).
//   platform port: every 4-byte signal (power on, NV on, ...) -> ack 0.
'use strict';
const net = require('net');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawn, execFileSync } = require('child_process');

function u32(n) { const b = Buffer.alloc(4); b.writeUInt32BE(n >>> 0); return b; }

function haveSwtpm() {
  try { execFileSync('swtpm', ['--version'], { stdio: 'ignore' }); return true; } catch (e) { return false; }
}

function listen(server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve(server.address().port));
  });
}

/** A port p with p + 1 free as well (swtpm's control port, the shim's platform port). */
async function freePair() {
  for (let i = 0; i < 50; i++) {
    const a = net.createServer();
    const p = await listen(a, 0);
    const b = net.createServer();
    const ok = p < 65535 && await listen(b, p + 1).then(() => true, () => false);
    await new Promise((r) => a.close(r));
    if (ok) await new Promise((r) => b.close(r));
    if (ok) return p;
  }
  throw new Error('no free port pair');
}

function canConnect(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(true); });
    s.on('error', () => resolve(false));
  });
}

function shim(swtpmPort) {
  return net.createServer((c) => {
    const up = net.connect(swtpmPort, '127.0.0.1');
    let inbuf = Buffer.alloc(0);
    let upbuf = Buffer.alloc(0);
    let waiting = false;
    const pump = () => {
      while (!waiting && inbuf.length >= 4) {
        const cmd = inbuf.readUInt32BE(0);
        if (cmd === 15) {
          if (inbuf.length < 8) return;
          inbuf = inbuf.slice(8);
          c.write(Buffer.concat([u32(1), u32(0), u32(0)]));
        } else if (cmd === 8) {
          if (inbuf.length < 9) return;
          const len = inbuf.readUInt32BE(5);
          if (inbuf.length < 9 + len) return;
          const body = inbuf.slice(9, 9 + len);
          inbuf = inbuf.slice(9 + len);
          waiting = true;
          up.write(body);
        } else if (cmd === 20) {
          inbuf = inbuf.slice(4);
        } else {
          c.destroy(new Error(`tpm shim: unknown simulator command ${cmd}`));
          return;
        }
      }
    };
    up.on('data', (d) => {
      upbuf = Buffer.concat([upbuf, d]);
      if (upbuf.length < 10) return;
      const len = upbuf.readUInt32BE(2); // the response header's size
      if (upbuf.length < len) return;
      const resp = upbuf.slice(0, len);
      upbuf = upbuf.slice(len);
      waiting = false;
      c.write(Buffer.concat([u32(resp.length), resp, u32(0)]));
      pump();
    });
    c.on('data', (d) => { inbuf = Buffer.concat([inbuf, d]); pump(); });
    c.on('close', () => up.destroy());
    c.on('error', () => up.destroy());
    up.on('error', () => c.destroy());
  });
}

/**
 * Runs `fn(tpm)` with a tss.js Tpm connected (through the shim) to a fresh
 * swtpm; stops both afterwards.
 */
async function withSoftTpm(fn) {
  const tss = require('tss.js');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'provisiond-interop-swtpm-'));
  const swPort = await freePair();
  const sw = spawn('swtpm', ['socket', '--tpm2',
    '--server', `type=tcp,port=${swPort},bindaddr=127.0.0.1`,
    '--ctrl', `type=tcp,port=${swPort + 1},bindaddr=127.0.0.1`,
    '--flags', 'not-need-init,startup-clear', '--tpmstate', `dir=${dir}`], { stdio: 'ignore' });
  const servers = [];
  try {
    for (let i = 0; i < 200 && !(await canConnect(swPort)); i++)
      await new Promise((r) => setTimeout(r, 50));
    const shimPort = await freePair();
    servers.push(shim(swPort));
    await listen(servers[0], shimPort);
    servers.push(net.createServer((c) => {
      c.on('data', (d) => { for (let i = 0; i + 4 <= d.length; i += 4) c.write(u32(0)); });
      c.on('error', () => {});
    }));
    await listen(servers[1], shimPort + 1);
    return await fn(new tss.Tpm(true, '127.0.0.1', shimPort));
  } finally {
    for (const s of servers) s.close();
    sw.kill('SIGTERM');
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

module.exports = { haveSwtpm, withSoftTpm };
