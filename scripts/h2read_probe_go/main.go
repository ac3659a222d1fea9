// A measurement probe, not part of contentfs: Content.Info and Content.Read of a
// store's committed blobs on hand-written HTTP/2 (h2c) framing in Go, one connection at
// a time, a bare pread per Read (no namespace checks). It measures what a native Read
// path would cost per call beside scripts/h2read_probe.py (README, Performance,
// ctr_get). Build with Debian's Go packages (golang-golang-x-net-dev):
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build -o /tmp/h2read-probe main.go
//	/tmp/h2read-probe ROOT /tmp/probe.sock & ctr -a /tmp/probe.sock content get sha256:...
package main

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/net/http2/hpack"
)

var root string

func frame(buf []byte, kind, flags byte, sid uint32, payload []byte) []byte {
	n := len(payload)
	buf = append(buf, byte(n>>16), byte(n>>8), byte(n), kind, flags,
		byte(sid>>24), byte(sid>>16), byte(sid>>8), byte(sid))
	return append(buf, payload...)
}

func varint(b []byte) (uint64, int) {
	var x uint64
	var s uint
	for i, c := range b {
		x |= uint64(c&0x7f) << s
		if c < 0x80 {
			return x, i + 1
		}
		s += 7
	}
	return 0, 0
}

// parse reads a ReadContentRequest (or an InfoRequest): digest 1, offset 2, size 3.
func parse(b []byte) (digest string, offset, size uint64) {
	for len(b) > 0 {
		key, n := varint(b)
		b = b[n:]
		switch key & 7 {
		case 0:
			v, m := varint(b)
			b = b[m:]
			if key>>3 == 2 {
				offset = v
			} else if key>>3 == 3 {
				size = v
			}
		case 2:
			l, m := varint(b)
			b = b[m:]
			if key>>3 == 1 {
				digest = string(b[:l])
			}
			b = b[l:]
		default:
			return
		}
	}
	return
}

func putVarint(b []byte, v uint64) []byte {
	for v >= 0x80 {
		b = append(b, byte(v)|0x80)
		v >>= 7
	}
	return append(b, byte(v))
}

var respHead = []byte("\x88\x0f\x10\x10application/grpc")
var trailers = []byte("\x00\x0bgrpc-status\x010")

func serve(c net.Conn) {
	defer c.Close()
	r := bufio.NewReaderSize(c, 1<<18)
	pre := make([]byte, 24)
	if _, err := io.ReadFull(r, pre); err != nil {
		return
	}
	var out []byte
	out = frame(out, 4, 0, 0, []byte{0, 4, 1, 0, 0, 0})
	wu := make([]byte, 4)
	binary.BigEndian.PutUint32(wu, 1<<30)
	out = frame(out, 8, 0, 0, wu)
	c.Write(out)
	out = out[:0]
	dec := hpack.NewDecoder(4096, nil)
	paths := map[uint32]string{}
	bodies := map[uint32][]byte{}
	fds := map[string]*os.File{}
	hdr := make([]byte, 9)
	maxFrame := 16384
	data := make([]byte, 1<<20)
	for {
		if r.Buffered() < 9 && len(out) > 0 {
			c.Write(out)
			out = out[:0]
		}
		if _, err := io.ReadFull(r, hdr); err != nil {
			return
		}
		n := int(hdr[0])<<16 | int(hdr[1])<<8 | int(hdr[2])
		kind, flags := hdr[3], hdr[4]
		sid := binary.BigEndian.Uint32(hdr[5:]) & 0x7fffffff
		payload := make([]byte, n)
		if _, err := io.ReadFull(r, payload); err != nil {
			return
		}
		switch kind {
		case 4:
			if flags&1 == 0 {
				out = frame(out, 4, 1, 0, nil)
			}
		case 6:
			if flags&1 == 0 {
				out = frame(out, 6, 1, 0, payload)
			}
		case 1:
			p := payload
			if flags&8 != 0 {
				p = p[1 : len(p)-int(p[0])]
			}
			if flags&0x20 != 0 {
				p = p[5:]
			}
			hf, err := dec.DecodeFull(p)
			if err != nil {
				fmt.Fprintln(os.Stderr, "probe:", err)
				return
			}
			for _, f := range hf {
				if f.Name == ":path" {
					paths[sid] = f.Value
				}
			}
		case 0:
			bodies[sid] = append(bodies[sid], payload...)
			if flags&1 == 0 {
				continue
			}
			body := bodies[sid][5:]
			path := paths[sid]
			delete(bodies, sid)
			delete(paths, sid)
			digest, offset, size := parse(body)
			name := filepath.Join(root, "blobs", "sha256", strings.TrimPrefix(digest, "sha256:"))
			var msg []byte
			if strings.HasSuffix(path, "/Read") {
				f := fds[digest]
				if f == nil {
					var err error
					if f, err = os.Open(name); err != nil {
						fmt.Fprintln(os.Stderr, "probe:", err)
						return
					}
					fds[digest] = f
				}
				if size == 0 || size > uint64(len(data)) {
					size = uint64(len(data))
				}
				k, err := f.ReadAt(data[:size], int64(offset))
				if err != nil && err != io.EOF {
					fmt.Fprintln(os.Stderr, "probe:", err)
					return
				}
				msg = append(msg, 0x12)
				msg = putVarint(msg, uint64(k))
				msg = append(msg, data[:k]...)
			} else {
				st, err := os.Stat(name)
				if err != nil {
					fmt.Fprintln(os.Stderr, "probe:", err)
					return
				}
				info := []byte{0x0a}
				info = putVarint(info, uint64(len(digest)))
				info = append(info, digest...)
				info = append(info, 0x10)
				info = putVarint(info, uint64(st.Size()))
				msg = append(msg, 0x0a)
				msg = putVarint(msg, uint64(len(info)))
				msg = append(msg, info...)
			}
			gm := make([]byte, 5, 5+len(msg))
			binary.BigEndian.PutUint32(gm[1:], uint32(len(msg)))
			gm = append(gm, msg...)
			out = frame(out, 1, 4, sid, respHead)
			for i := 0; i < len(gm); i += maxFrame {
				j := i + maxFrame
				if j > len(gm) {
					j = len(gm)
				}
				out = frame(out, 0, 0, sid, gm[i:j])
			}
			out = frame(out, 1, 5, sid, trailers)
			c.Write(out)
			out = out[:0]
		case 7:
			return
		}
	}
}

func main() {
	root = os.Args[1]
	os.Remove(os.Args[2])
	l, err := net.Listen("unix", os.Args[2])
	if err != nil {
		panic(err)
	}
	fmt.Fprintln(os.Stderr, "probe: serving", root, "on", os.Args[2])
	for {
		c, err := l.Accept()
		if err != nil {
			panic(err)
		}
		serve(c)
	}
}
