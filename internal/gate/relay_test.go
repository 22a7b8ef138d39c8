package gate

import "testing"

func TestTagRows(t *testing.T) {
	for _, c := range []struct {
		tag  string
		want int64
	}{
		{"DELETE 3\x00", 3},
		{"INSERT 0 1\x00", 1},
		{"SELECT 250\x00", 250},
		{"UPDATE 0\x00", 0},
		{"MERGE 9223372036854775799\x00", 9223372036854775799},
		{"UPDATE 99999999999999999999\x00", -1}, // too large to count
		{"BEGIN\x00", -1},
		{"SELECT \x00", -1},
		{"SELECT 1x\x00", -1},
		{"SELECT -1\x00", -1},
		{"", -1},
	} {
		if got := tagRows([]byte(c.tag)); got != c.want {
			t.Errorf("tagRows(%q) = %d, want %d", c.tag, got, c.want)
		}
	}
}

func TestCommandTagFollowsBlocks(t *testing.T) {
	r := &relay{}
	steps := []struct {
		tag            string
		block, failed  bool
		failBeforehand bool
	}{
		{"BEGIN\x00", true, false, false},
		{"UPDATE 1\x00", true, true, true}, // an error marked the block failed; a tag in between changes nothing
		{"ROLLBACK\x00", false, false, false},
		{"START TRANSACTION\x00", true, false, false},
		{"COMMIT\x00", false, false, false},
		{"SELECT 1\x00", false, false, false},
	}
	for _, st := range steps {
		if st.failBeforehand {
			r.failed = true
		}
		r.commandTag([]byte(st.tag))
		if r.block != st.block || r.failed != st.failed {
			t.Fatalf("after %q: block %v failed %v, want %v %v", st.tag, r.block, r.failed, st.block, st.failed)
		}
	}
}
